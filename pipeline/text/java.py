"""Java is required: pycocoevalcap's PTB tokenizer, METEOR and SPICE are Java programs."""
from __future__ import annotations

import shutil
import subprocess

from pipeline.core.errors import CaplineError

INSTALL_HINT = (
    "install a Java runtime (8 or newer), e.g. `apt-get install openjdk-17-jre-headless` "
    "on Debian/Ubuntu or `conda install -c conda-forge openjdk`, and make sure `java` is on PATH"
)


class JavaMissingError(CaplineError):
    """Raised before any scoring work when no usable `java` is found."""


class JavaToolError(CaplineError):
    """A Java scorer (PTB tokenizer, METEOR, SPICE) failed while running."""


def require_java() -> str:
    """Return the path of a working `java`; raise JavaMissingError naming the fix otherwise."""
    java = shutil.which("java")
    if java is None:
        raise JavaMissingError(
            "Java not found on PATH: evaluation runs pycocoevalcap's PTB tokenizer and METEOR, "
            f"which are Java programs; {INSTALL_HINT}"
        )
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise JavaMissingError(f"Java at {java} does not run ({err}); {INSTALL_HINT}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise JavaMissingError(
            f"Java at {java} failed (`java -version` exited {proc.returncode}: {tail[0]}); {INSTALL_HINT}"
        )
    return java
