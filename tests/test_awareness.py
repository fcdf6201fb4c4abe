from meshd.protocol.awareness import Awareness, failed_probe_delta


def test_score_is_clamped_and_scales_timeouts():
    a = Awareness(8)
    assert a.factor == 1
    a.apply(3)
    assert a.score == 3 and a.factor == 4
    a.apply(100)
    assert a.score == 7 and a.factor == 8  # max_multiplier - 1
    a.apply(-100)
    assert a.score == 0 and a.factor == 1
    a.score = 2  # set directly (tests do): the factor follows
    assert a.factor == 3


def test_failed_probe_counts_missing_nacks():
    assert failed_probe_delta(expected_nacks=3, nacks=0) == 3
    assert failed_probe_delta(expected_nacks=3, nacks=3) == 0  # helpers spoke: not our link
    assert failed_probe_delta(expected_nacks=0, nacks=0) == 1
