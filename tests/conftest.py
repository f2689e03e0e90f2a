"""Test-session settings: nothing a test does may write into the user's home directory."""

import os
import tempfile

# Galleries default to $XDG_DATA_HOME/facerec/galleries.sqlite3: point that at a throw-away folder
# for every test (subprocesses inherit it), so a test that reaches a gallery route without its own
# FACEREC_GALLERY_PATH never touches ~/.local/share.
_DATA_HOME = tempfile.mkdtemp(prefix="facerec-tests-xdg-")
os.environ["XDG_DATA_HOME"] = _DATA_HOME
