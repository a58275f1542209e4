"""Run report: metrics.jsonl -> PNG plots + HTML page, with sections other stages add; the demo's report."""

import json
import re

from PIL import Image

from vlmforge.config import load_recipe, save_resolved
from vlmforge.demo.gallery import gallery_picks
from vlmforge.demo.report import curation_table, stage_kind, timeline_rows, write_demo_report
from vlmforge.demo.scaling import best_of_n_results
from vlmforge.report import Section, build_report
from vlmforge.report.plots import moving_mean


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
        assert f'href="plots/{png}"><img src="data:image/png;base64,' in html
    assert "Eval scores" in html and "<td>mcq</td>" in html and '<td class="num">0.75</td>' in html
    assert 'href="config.yaml"' in html and 'href="metrics.jsonl"' in html
    assert "0.1" in html  # data wait fraction 0.05 / 0.5 in the summary table


def test_report_without_metrics(tmp_path):
    html = build_report(tmp_path, title="empty <run>").read_text()
    assert "No metrics yet" in html and "empty &lt;run&gt;" in html


# ---------------------------------------------------------------- the demo's report

PHASE_DIRS = ("init", "pretrain", "sft", "mpo")
STAGES = [
    {"stage": "synth", "seconds": 2.0, "command": "vlmforge synth --out d/world"},
    {"stage": "curate: train filter network", "seconds": 3.0, "command": "vlmforge curate train-filter --in x"},
    {"stage": "sft", "seconds": 9.5, "command": "vlmforge train --recipe demo/sft"},
    {"stage": "eval after SFT", "seconds": 4.0, "command": "vlmforge eval --ckpt runs/sft/final"},
]


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _vqa_rows():
    # the last one's image lies outside the task's folder: never shown
    return [{"id": f"vqa-{i}", "image": f"images/vqa-{i}.png" if i < 7 else "../outside.png",
             "question": f"What colour is shape {i}?", "answer": "red", "category": "color"} for i in range(8)]


# after SFT / after MPO correct, per vqa question: 2 fixed, 2 broke, 3 both right, 1 both wrong
VQA_OUTCOMES = [(False, True), (False, True), (True, False), (True, False), (True, True), (True, True), (True, True),
                (False, False)]


def _predictions(phase: str) -> list[dict]:
    rows = []
    for i, (sft, mpo) in enumerate(VQA_OUTCOMES):
        ok = sft if phase != "mpo" else mpo
        rows.append({"task": "synth-vqa", "id": f"vqa-{i}", "prompt": "<image>\nWhat colour?", "shots": 0,
                     "prediction": "red" if ok else "blue", "extracted": "red" if ok else "blue",
                     "answer": ["red"] * 10, "score": float(ok), "correct": ok})
    # MCQ: the question as asked (right after SFT, wrong after MPO), a rotation and the likelihood protocol
    # (both the other way round: neither may count)
    mcq = {"task": "synth-mcq", "id": "mcq-0", "prompt": "<image>\nWhich?", "shots": 0, "answer": "B"}
    ok = phase != "mpo"
    rows.append({**mcq, "prediction": "B" if ok else "A", "extracted": "B" if ok else "A", "score": float(ok), "correct": ok})
    rows.append({**mcq, "id": "mcq-0#r1", "prediction": "C", "extracted": "C", "score": float(not ok), "correct": not ok})
    rows.append({**mcq, "protocol": "likelihood", "prediction": "x", "extracted": "B", "score": 1.0, "correct": True})
    return rows


def _results(world, scores: dict) -> dict:
    return {"tasks": {
        "synth-vqa": {"kind": "vqa", "path": str(world / "eval" / "vqa.jsonl"), "primary": "vqa_accuracy",
                      "chance": {"vqa_accuracy": 0.0}, "counts": {"n": 8}, "metrics": {"vqa_accuracy": scores["vqa"]}},
        "synth-mcq": {"kind": "mmbench", "path": str(world / "eval" / "mcq.jsonl"), "primary": "circular_accuracy",
                      "chance": {"circular_accuracy": 0.0039, "accuracy": 0.25}, "counts": {"n": 4},
                      "metrics": {"circular_accuracy": scores["mcq"], "accuracy": scores["mcq"]}}}}


BEST_OF_N = {"n": 4, "ks": [1, 2, 4], "select": "prm", "aggregate": "mean", "temperature": 0.7, "top_p": 0.95,
             "curves": {"first": [0.3, 0.3, 0.3], "majority": [0.3, 0.35, 0.4], "orm": [0.3, 0.36, 0.41],
                        "prm": [0.3, 0.38, 0.45], "pass": [0.3, 0.5, 0.65]}}


def _fake_demo(root):
    """A demo folder with every input of every report section, tiny."""
    world = root / "world"
    _jsonl(world / "eval" / "vqa.jsonl", _vqa_rows())
    _jsonl(world / "eval" / "mcq.jsonl", [{"id": "mcq-0", "image": "images/mcq-0.png", "question": "Which shape?",
                                          "options": {"A": "circle", "B": "star"}, "answer": "B", "category": "shape"}])
    (world / "eval" / "images").mkdir(parents=True)
    for name in [f"vqa-{i}" for i in range(7)] + ["mcq-0"]:
        Image.new("RGB", (16, 16), (200, 30, 30)).save(world / "eval" / "images" / f"{name}.png")
    Image.new("RGB", (16, 16)).save(world / "outside.png")
    _write(world / "manifest.json", {"counts": {"captions": {"captions": 100, "clean": 80,
                                                             "faults": {"mismatch": 12, "exact_duplicate": 4, "non_image": 4}}}})
    for i, phase in enumerate(PHASE_DIRS):
        _write(root / "eval" / phase / "results.json", _results(world, {"vqa": 0.2 * i, "mcq": 0.1 * i}))
        _jsonl(root / "eval" / phase / "predictions.jsonl", _predictions(phase))
    _write(root / "eval" / "bestofn" / "results.json", {"tasks": {"synth-math": {"primary": "accuracy", "best_of_n": BEST_OF_N}}})
    for stage, recipe in (("pretrain", "demo/pretrain"), ("sft", "demo/sft"), ("mpo", "demo/mpo")):
        save_resolved(load_recipe(recipe), root / "runs" / stage)
        rows = [{"step": s, "loss": 3.0 / s, "rewards/margin": 0.01 * s, "rewards/accuracy": 0.5 + 0.004 * s}
                for s in range(1, 61)]
        live = [{"step": s, "samples_seen": 10 * s, "eval/synth-vqa/vqa_accuracy": s / 60} for s in (0, 30, 60)]
        _jsonl(root / "runs" / stage / "metrics.jsonl", rows if stage == "mpo" else
               [{"step": s, "loss": 3.0 / s} for s in range(1, 61)] + (live if stage == "sft" else []))
    _write(root / "curate" / "filtered" / "manifest.json", {"ground_truth": {
        "mismatched": 12, "mismatched_removed": 10, "mismatch_recall": 10 / 12, "clean": 80, "clean_kept": 78,
        "clean_kept_frac": 78 / 80, "precision": 10 / 13, "precision_any_fault": 11 / 13,
        "removed_by_fault": {"mismatch": 10, "clean": 2, "exact_duplicate": 1}, "corrupt_by_fault": {"non_image": 4}}})
    _write(root / "curate" / "curated" / "manifest.json", {"ground_truth": {
        "exact_duplicate_groups_with_one_copy_left": "3/3", "clean_removed": 0,
        "removed_by_fault": {"exact_duplicate|exact_duplicate_image": 2, "clean|exact_duplicate_image": 1}}})
    _write(root / "packed" / "manifest.json", {"fill": {"mean_fill": 0.98, "tokens": 1000}})
    _write(root / "eval" / "prm_steps" / "scores.manifest.json", {"stage": "prm-score", "labels": {
        "threshold": 0.5, "steps": 10, "plus_steps": 6, "minus_steps": 4, "step_accuracy": 0.7, "plus_accuracy": 0.5,
        "minus_accuracy": 1.0, "solutions": 3, "wrong_solutions": 2, "first_error_found": 0.5}})
    return root


SECTIONS = ("What was trained", "Benchmarks (held-out images) vs chance", "Benchmarks during SFT", "Held-out questions", "MPO: reward margin",
            "Best-of-N: accuracy vs N", "Critic: steps it flags", "Curation: what was kept and dropped", "Packing", "Training loss", "Timeline",
            "Stages (each is a command")


def test_demo_report_has_every_section_and_opens_offline(tmp_path):
    demo = _fake_demo(tmp_path / "demo")
    page = write_demo_report(demo, STAGES, size="tiny", curated=True).read_text()
    for title in SECTIONS:
        assert f">{title}" in page, title
    assert "Not shown" not in page
    for png in ("scores.png", "sft_eval.png", "mpo_rewards.png", "best_of_n.png", "losses.png", "timeline.png"):
        assert (demo / "plots" / png).stat().st_size > 1000, png
    # offline: every image is embedded; links are anchors or files of the demo folder
    srcs = re.findall(r'src="([^"]*)"', page)
    # 6 plots and the images of the 9 questions, less the one outside its folder
    assert len(srcs) == 6 + 8 and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r'(src|href)="(https?:|file:|//)', page)
    for href in re.findall(r'href="([^"#][^"]*)"', page):
        assert (demo / href).is_file(), href
    assert "<script" not in page and "<link" not in page
    # the gallery: MCQ replies read with their option's text; the gold answer too
    assert "A (circle)" in page and "B (star)" in page
    # the summary the lead's tests read keeps its keys
    summary = json.loads((demo / "demo_summary.json").read_text())
    assert {"size", "scores", "stages", "curation", "packing"} <= set(summary)
    assert (demo / "scores.txt").read_text().startswith("benchmark")


def test_gallery_picks_a_fixed_mix_of_outcomes_the_same_every_time(tmp_path):
    demo = _fake_demo(tmp_path / "demo")
    picks, counts = gallery_picks(demo, n=7)
    # 9 questions as asked (8 VQA + the MCQ's first rotation, generated); rotations and likelihood rows ignored
    assert counts == {"fixed": 2, "broke": 3, "right": 3, "wrong": 1}
    # wanted 4 fixed, 4 broke, 3 right, 1 wrong: fixed and broke run short, so 2 + 3 + 2 of the 3 right ones
    assert [p["outcome"] for p in picks] == ["fixed"] * 2 + ["broke"] * 3 + ["right"] * 2
    assert {p["id"] for p in picks if p["outcome"] == "fixed"} == {"vqa-0", "vqa-1"}
    assert "mcq-0" in {p["id"] for p in picks if p["outcome"] == "broke"}
    assert gallery_picks(demo, n=7) == (picks, counts)
    assert len(gallery_picks(demo)[0]) == 9  # asked for 12, 9 exist


def test_curation_table_counts_each_kind_of_pair_through_filter_and_dedup(tmp_path):
    rows = {r["caption pair"]: r for r in curation_table(_fake_demo(tmp_path / "demo"))}
    assert rows["clean"] == {"caption pair": "clean", "in the crawl": 80, "kept by the filter": 78,
                             "dropped: filter network": 2, "dropped: unreadable": 0, "removed by dedup": 1,
                             "left in the curated set": 77}
    assert rows["mismatch"]["kept by the filter"] == 2 and rows["non image"]["dropped: unreadable"] == 4
    assert rows["exact duplicate"]["removed by dedup"] == 2 and rows["exact duplicate"]["left in the curated set"] == 1
    total = list(rows.values())[-1]
    assert total["caption pair"] == "all faulty"
    assert total["in the crawl"] == 20 and total["kept by the filter"] == 2 + 3 and total["left in the curated set"] == 3


def test_timeline_shows_whatever_stages_ran(tmp_path):
    new = [{"stage": "prm data", "seconds": 30.0, "command": "vlmforge prm-data --ckpt runs/sft/final"},
           {"stage": "prm", "seconds": 60.0, "command": "vlmforge train --recipe demo/prm"},
           {"stage": "eval best-of-n", "seconds": 90.0, "command": "vlmforge eval --best-of-n 8 --critic runs/prm/final"},
           {"stage": "no timing", "command": "vlmforge x"}]
    assert timeline_rows(STAGES + new)[-3:] == [("prm data", 30.0, "data"), ("prm", 60.0, "training"),
                                                ("eval best-of-n", 90.0, "evaluation")]
    assert [stage_kind(r) for r in STAGES] == ["data", "training", "training", "evaluation"]
    page = write_demo_report(_fake_demo(tmp_path / "demo"), STAGES + new, size="tiny", curated=True).read_text()
    assert "eval best-of-n" in page and "vlmforge prm-data --ckpt runs/sft/final" in page


def test_best_of_n_is_found_in_any_eval_folder_or_where_told(tmp_path):
    demo = _fake_demo(tmp_path / "demo")
    (found,) = best_of_n_results(demo)
    assert found[:2] == ("bestofn", "synth-math") and found[2]["curves"]["pass"] == [0.3, 0.5, 0.65]
    assert best_of_n_results(demo, demo / "eval" / "sft") == []
    assert best_of_n_results(demo, demo / "eval" / "bestofn" / "results.json") == [found]
    page = write_demo_report(demo, STAGES, size="tiny", curated=True, best_of_n=demo / "eval" / "bestofn").read_text()
    assert "pass@N" in page and "<th>N=4</th>" in page and ">0.650<" in page


def test_demo_report_without_inputs_leaves_sections_out_with_a_note(tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    page = write_demo_report(demo, [], size="tiny", curated=False).read_text()
    for title in ("What was trained", "Benchmarks during SFT", "Held-out questions", "MPO: reward margin", "Best-of-N",
                  "Curation", "Timeline"):
        assert re.search(rf">{re.escape(title)}[^<]*</h2>\s*<p class=\"note\">Not shown: ", page), title
    # only some phases evaluated, no MPO run, curation without ground truth: still a report
    demo2 = _fake_demo(tmp_path / "demo2")
    for gone in ("eval/mpo/results.json", "eval/mpo/predictions.jsonl", "runs/mpo/metrics.jsonl",
                 "curate/filtered/manifest.json", "eval/bestofn/results.json"):
        (demo2 / gone).unlink()
    page = write_demo_report(demo2, STAGES, size="tiny", curated=True).read_text()
    assert page.count("Not shown: ") == 4 and "after MPO" in page


def test_moving_mean_is_centred():
    assert moving_mean([1, 2, 3, 4, 5], 3).tolist() == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert moving_mean([2.0], 5).tolist() == [2.0]


def test_live_eval_table_and_curves_show_scores_not_counts(tmp_path):
    from vlmforge.report.builder import eval_table
    from vlmforge.report.plots import eval_curves_plot

    rows = [{"step": 1, "loss": 2.0},
            {"step": 0, "samples_seen": 0, "eval/pope/f1": 0.0, "eval/pope/tp": 0, "eval/pope/f1/random": 0.0,
             "eval/mcq/n_questions": 48, "eval/mcq/accuracy": 0.25},
            {"step": 4, "samples_seen": 40, "eval/pope/f1": 0.5, "eval/pope/tp": 12, "eval/pope/f1/random": 0.6,
             "eval/mcq/n_questions": 48, "eval/mcq/accuracy": 0.5}]
    table = eval_table(rows)
    assert table == [{"score": "pope f1", "0 seen": 0.0, "40 seen": 0.5},
                     {"score": "mcq accuracy", "0 seen": 0.25, "40 seen": 0.5}]
    assert eval_curves_plot(rows, tmp_path / "eval.png").is_file()
    only_counts = [{"step": 0, "samples_seen": 0, "eval/mcq/n_questions": 48, "eval/pope/tp": 3}]
    assert eval_curves_plot(only_counts, tmp_path / "none.png") is None
