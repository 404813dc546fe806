"""File helpers shared by the data scripts: atomic writes and cached downloads."""
import os
import urllib.error
import urllib.request

import numpy as np


def atomic_write(path, write):
    """Call write(f) on a temporary file beside `path`, then rename it to `path`: readers never see
    a half-written file, and an interrupted run leaves no file under the final name."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_tokens(path, tokens):
    """Write a 1-D uint16 token array as a .npy file (np.load(path, mmap_mode="r") reads it back)."""
    atomic_write(path, lambda f: np.save(f, np.asarray(tokens, dtype=np.uint16), allow_pickle=False))


def fetch(url, path, what, timeout=60):
    """Download `url` to `path` once (kept there for later runs); returns path. Offline, a
    RuntimeError says where to put the file by hand."""
    if os.path.isfile(path):
        return path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            atomic_write(path, lambda f: f.write(response.read()))
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(f"cannot download {what} from {url} ({err}); without internet, download "
                           f"it on another machine and copy it to {path}") from err
    return path
