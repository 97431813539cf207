"""Reading, converting, adapting and reporting on weight files."""
