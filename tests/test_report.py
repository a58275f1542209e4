"""Run report: metrics.jsonl -> PNG plots + HTML page, with sections other stages add."""

import json

from vlmforge.report import Section, build_report


def test_report_from_metrics(tmp_path):
    rows = [{"step": s, "loss": 5.0 / s, "lr/llm": 1e-4 * s, "lr/projector": 1e-3, "grad_norm": 1.0,
             "tokens_per_s": 1000.0 + s, "real_token_fraction": 0.9, "step_time": 0.5, "data_wait": 0.05} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # cut line
    (tmp_path / "config.yaml").write_text("name: x\n")
    extra = Section("Eval scores", text="synthetic benchmark", table=[{"task": "mcq", "accuracy": 0.75}])
    out = build_report(tmp_path, extra_sections=[extra])
    html = out.read_text()
    for png in ("loss.png", "lr.png", "throughput.png", "step_time.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000
        assert f'src="plots/{png}"' in html
    assert "Eval scores" in html and "<td>mcq</td>" in html and "<td>0.75</td>" in html
    assert 'href="config.yaml"' in html and 'href="metrics.jsonl"' in html
    assert "0.1" in html  # data wait fraction 0.05 / 0.5 in the summary table


def test_report_without_metrics(tmp_path):
    html = build_report(tmp_path, title="empty <run>").read_text()
    assert "No metrics yet" in html and "empty &lt;run&gt;" in html
