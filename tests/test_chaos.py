"""The short form of the chaos soak (the long one: `python -m hubfast.testing.chaos
--iterations 200 --load`): random kills and server faults, then every entry
byte-identical, no lock held, nothing left behind, no defect."""
from hubfast.testing import chaos


def test_chaos_soak_short(tmp_path):
    counts = chaos.run(iterations=12, workers=3, seed=1234, work=tmp_path, timeout=60, log=lambda *_: None)
    assert counts.defects == []
    assert counts.iterations == 12 and counts.entries_checked == 12
    # The chaos really happened: kills landed, some of them mid-transfer, faults injected.
    assert counts.kills + counts.sigterms >= 6
    assert counts.kills_mid_transfer >= 1
    assert counts.faults >= 4
