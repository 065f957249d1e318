#!/usr/bin/env python3
"""dkimpy side of the interop test (pip: dkimpy, pynacl).

  dkimpy.py verify RECORDS MESSAGE   -> prints "pass" per DKIM-Signature that verifies, else "fail"
  dkimpy.py sign KEYFILE SELECTOR DOMAIN CANON MESSAGE -> prints the DKIM-Signature header line(s)

RECORDS holds "name record" lines (the keys DNS would publish).
"""
import sys

import dkim


def load_records(path):
    records = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                name, record = line.split(" ", 1)
                records[name.rstrip(".").lower()] = record.encode()
    return records


def main():
    if sys.argv[1] == "verify":
        records = load_records(sys.argv[2])
        message = open(sys.argv[3], "rb").read()

        def dnsfunc(name, timeout=5):
            return records.get(name.decode().rstrip(".").lower(), b"")

        d = dkim.DKIM(message)
        count = message.split(b"\r\n\r\n", 1)[0].lower().count(b"\ndkim-signature:") + (
            1 if message.lower().startswith(b"dkim-signature:") else 0)
        for idx in range(count):
            ok = d.verify(idx=idx, dnsfunc=dnsfunc)
            print("pass" if ok else "fail")
    elif sys.argv[1] == "sign":
        key, selector, domain, canon, path = sys.argv[2:7]
        message = open(path, "rb").read()
        header, body = canon.split("/")
        sig = dkim.sign(message, selector.encode(), domain.encode(), open(key, "rb").read(),
                        canonicalize=(header.encode(), body.encode()),
                        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
        sys.stdout.write(sig.decode())


if __name__ == "__main__":
    main()
