"""CPU smoke tests of the issue-17 device steps (bench/device_run.sh "tune" and "results"):
their Python parts import, plan and run here (tiny shapes, the interpreter); the timing
itself needs the lent GPU."""
import json

from bench import matched_loss_grad_device, triton_tune

from locoprop_kernels.triton_kernels import config_table, configs


def test_results_step_dry_run(tmp_path):
    assert matched_loss_grad_device.main(["--dry-run", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "matched-loss-grad-device.json").read_text())["rows"]
    assert {(r["activation"], r["precision"]) for r in rows} == {
        (a, p) for a in matched_loss_grad_device.ACTS for p in matched_loss_grad_device.PRECISIONS}
    for r in rows:
        assert r["within_bound"], r
        assert all(r[f"{name}_ms"] > 0 for name in matched_loss_grad_device.ROUTES + ["eager"]), r
        # On the CPU the backend does not time: the auto route is fused, not timed.
        assert (r["route"], r["route_how"]) == ("fused", "not timed (device cpu)"), r


def test_tuning_step_plan_covers_every_shipped_row(capsys):
    assert triton_tune.main(["--dry-run"]) == 0
    assert "config rows" in capsys.readouterr().out
    assert set(triton_tune.rows()) == {k for k in config_table.TABLE if k.endswith("/any")}


def test_table_renders_back_to_itself(tmp_path):
    """What the tuning step writes is the module the launchers import."""
    text = configs.render_table(config_table.TABLE, "card X", "note")
    namespace = {}
    exec(compile(text, "config_table.py", "exec"), namespace)
    assert namespace["TABLE"] == config_table.TABLE and namespace["CARD"] == "card X"
