"""The tuning step's split-K sweep (bench/triton_tune.py): the stage-2 rows carry a split
cap through the candidates and into the rows it writes, which the launchers read back."""
import torch

from bench import triton_tune

from locoprop_kernels.triton_kernels import config_table, configs


def test_stage2_candidates_carry_the_split_cap():
    for key, cands in triton_tune.rows().items():
        stage2 = key.split("/")[0] in triton_tune.SPLIT_KERNELS
        assert all(len(c) == (6 if stage2 else 5) for c in cands), key
        if stage2:
            assert {c[5] for c in cands} == {triton_tune.SPLIT_K_DEFAULT}


def test_written_row_is_what_lookup_returns():
    cand = (64, 64, 32, 4, 1, 3)
    row = triton_tune.as_row(cand, "timed", card="card X")
    assert row["split_k"] == 3 and row["chosen_by"] == "timed"
    key = configs.key("weight_grad", "-", "fp32", "ieee", "large")
    saved = dict(config_table.TABLE)
    try:
        config_table.TABLE[key] = row
        cfg = configs.lookup("weight_grad", torch.float32, "ieee",
                             shape=(1000, 1000, 1000))
        assert cfg == configs.Config(64, 64, 32, 4, 1, split_k=3)
    finally:
        config_table.TABLE.clear()
        config_table.TABLE.update(saved)
    assert "split_k" not in triton_tune.as_row(cand[:5], "compile-check")
