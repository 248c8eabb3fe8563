"""What a tenant's CUDA source may ask of the compiler, and what it hears back.

NVRTC runs inside the worker process and follows ``#include "/any/path"``:
with NVRTC 13.5 the compile log of ``#include "/srv/secret.txt"`` quoted
the file's first tokens (``secret.txt(1): error: identifier "TOPSECRET"``),
and that log travels to the tenant.  Workers compile with no include path
at all (NVRTC 13 then finds no header, not even ``cuda_fp16.h``), so the
only thing an include could reach is a file of the worker's machine: every
file-reading preprocessor construct is refused before NVRTC sees the
source, and options are taken from an allowlist (no ``-I``, no
``--pre-include``, no precompiled-header or time-trace files).

The check is deliberately context-free: it does not try to tell a comment
or a string literal from code (a wrong guess there is exactly how a
directive slips through), so ``#include`` in a comment is refused too.

Compiler logs are cut to the tenant's own file and a bounded length before
they leave the worker (:func:`tenant_log`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..graph.errors import KernelDefinitionError

#: Directives that read a file (``#import`` and ``#include_next`` are GNU
#: and EDG extensions, ``#embed`` is C23/C++26).
FILE_DIRECTIVES = frozenset({"include", "include_next", "import", "embed"})
#: Operators that ask whether a file exists (an oracle on the worker's disk).
_FILE_PROBES = re.compile(r"__has_(include|include_next|embed)\b")
#: A directive's introducer (``#``, its digraph ``%:`` or trigraph ``??=``),
#: blanks (newlines too: over-refusing is fine), then the directive's name,
#: or a block comment (comments become a space before directives are read,
#: so ``#/* */include`` is an include: any comment there is refused, which
#: keeps the scan linear in the source's length).
_DIRECTIVE = re.compile(r"(?:#|%:|\?\?=)\s*(/\*|[A-Za-z_\\$][\w\\$]*)")
#: Line splices, also spelled with the trigraph for a backslash.
_SPLICE = re.compile(r"(?:\\|\?\?/)[ \t]*\r?\n")

#: NVRTC options a tenant may pass, by exact value or by prefix (``=`` form).
ALLOWED_OPTIONS = frozenset({
    "-use_fast_math", "--use_fast_math", "-lineinfo", "--generate-line-info",
    "-G", "--device-debug", "-restrict", "--restrict", "-default-device",
    "--device-as-default-execution-space", "-extra-device-vectorization",
    "--extra-device-vectorization", "-w", "--disable-warnings", "-device-int128",
    "--device-int128",
})
_VALUED_OPTIONS = re.compile(
    r"(?:-{1,2})(?:ftz|prec-div|prec-sqrt|fmad)=(?:true|false)"
    r"|(?:-{1,2})maxrregcount=\d{1,4}"
    # C++03 is refused: it has no raw strings, which changes what is code.
    r"|(?:-{1,2})std=c\+\+(?:11|14|17|20)"
    r"|(?:-D|--define-macro=)[A-Za-z_]\w*(?:=[^\x00-\x1f]*)?"
    r"|(?:-U|--undefine-macro=)[A-Za-z_]\w*")
#: Longest log quoted back to a tenant.
MAX_LOG_CHARS = 4000
MAX_LOG_LINES = 60


def source_problem(source: str) -> str | None:
    """Why ``source`` may not be compiled on a worker, or None."""
    flat = _SPLICE.sub("", source)
    for m in _DIRECTIVE.finditer(flat):
        word = m.group(1)
        if word == "/*":
            return ("a comment between '#' and a directive's name is refused (it could hide "
                    "an #include)")
        if "\\" in word or word.lower().replace("$", "") in FILE_DIRECTIVES or "$" in word:
            return (f"'#{word}' is refused: kernels are compiled without an include path and "
                    "may not read files of the worker; put the declarations you need in the "
                    "source itself")
    probe = _FILE_PROBES.search(flat)
    if probe:
        return f"'{probe.group(0)}' is refused: kernels may not probe the worker's files"
    return None


def option_problem(option: str) -> str | None:
    """Why NVRTC ``option`` is refused, or None."""
    if option in ALLOWED_OPTIONS or _VALUED_OPTIONS.fullmatch(option):
        return None
    return (f"NVRTC option {option[:80]!r} is not allowed (the worker chooses the "
            "architecture and gives no include path); allowed: -D/-U macros, -std=c++11..20, "
            "fast-math, line info, ftz/prec-div/prec-sqrt/fmad, maxrregcount and the like")


def check_source(source: str, options: Sequence[str], kernel: str) -> None:
    """Raise KernelDefinitionError unless the source and every option may be
    compiled on a worker."""
    problem = source_problem(source)
    if problem is None:
        for option in options:
            problem = option_problem(option)
            if problem:
                break
    if problem:
        raise KernelDefinitionError(problem, kernel=kernel)


def tenant_log(log: str, program: str) -> str:
    """The part of an NVRTC log a tenant may read: diagnostics about its own
    program (``program`` is the file name NVRTC was given), each with the
    quoted source lines that follow it, cut to a bounded length.  A
    diagnostic located in any other file is left out with its quote."""
    own = f"{program}("
    located = re.compile(r"^\S+\(\d+\): ")
    out: list[str] = []
    keep = True
    dropped = 0
    for line in log.replace("\x00", "").splitlines():
        if located.match(line):
            keep = line.startswith(own)
        elif line.startswith(("Error limit", "1 error", "2 errors")) or " detected in the " \
                "compilation of " in line:
            keep = True
            line = re.sub(r'"[^"]*"', f'"{program}"', line)
        if keep:
            out.append(line)
        else:
            dropped += 1
    if dropped:
        out.append(f"({dropped} line(s) about other files left out)")
    if len(out) > MAX_LOG_LINES:
        out = out[:MAX_LOG_LINES] + [f"... ({len(out) - MAX_LOG_LINES} more lines)"]
    text = "\n".join(out)
    if len(text) > MAX_LOG_CHARS:
        text = text[:MAX_LOG_CHARS] + f"... ({len(text) - MAX_LOG_CHARS} more characters)"
    return text
