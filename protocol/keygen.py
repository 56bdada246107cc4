"""``draftstream keygen DIR [--name NAME]``: write a ZeroMQ CURVE key pair for tcp:// links.

The trainer host keeps ``trainer.key_secret`` and hands ``trainer.key`` (public) to producers;
each producer makes its own pair, and its public key goes into the trainer's authorized-keys
directory when only known producers may connect.
"""

from __future__ import annotations

import argparse

from protocol.sockets import make_curve_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="draftstream keygen", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where to write NAME.key and NAME.key_secret")
    parser.add_argument("--name", default="draftstream", help="file stem of the key pair")
    args = parser.parse_args(argv)
    public, secret = make_curve_keys(args.directory, args.name)
    print(f"public key: {public}\nsecret key: {secret}  (keep this one private)")
    return 0
