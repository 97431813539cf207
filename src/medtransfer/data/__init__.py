"""Data: read what users have (images and dataset layouts), check it, prepare it into a cache, and phantoms."""
