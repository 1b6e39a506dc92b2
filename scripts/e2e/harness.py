"""What the loopback test scripts share (stress.py, abuse.py, interleave.py): byte
sizes as afo writes them, exit statuses, model ids, and the busy count of /health."""
import argparse
import os
import re
import signal

MIB = 1 << 20
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_bytes(text):
    """'700MiB' -> 734003200 (the units afo's ByteSize takes)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 700MiB, 2GiB, 800MB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def mib(n):
    return "-" if n is None else f"{n / MIB:.1f} MiB"


def describe_exit(code):
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def model_id(path):
    """The id `afo serve` gives a model: the file name without its extension."""
    name = os.path.basename(os.path.normpath(path))
    return name.rsplit(".", 1)[0] if "." in name else name


def busy(h):
    """Requests running or waiting on any model, from a /health body (the models are
    listed only to a client with the key, when the server has one)."""
    return sum(m.get("running", 0) + m.get("waiting", 0) for m in (h or {}).get("models", []))
