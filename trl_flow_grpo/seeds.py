"""Seeds derived from several integers by hashing: the same on every process, platform and run, with no RNG state
to carry or to checkpoint."""

import hashlib


def stable_seed(*parts: int, namespace: str = "", bits: int = 63) -> int:
    """A `bits`-bit integer derived from `parts` (and `namespace`, which keeps the uses of one set of parts apart).

    The default (63 bits) is a valid `torch.Generator.manual_seed`; the SDE windows use 64 bits.
    """
    digest = hashlib.sha256((namespace + ",".join(map(str, parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - bits)
