import re

import torch

from medtransfer.provenance import git_commit, versions


def test_versions_name_what_produced_an_output():
    v = versions()
    assert v["torch"] == torch.__version__ and v["medtransfer"] == "0.1.0"
    commit = git_commit()
    assert v["git_commit"] == commit
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
