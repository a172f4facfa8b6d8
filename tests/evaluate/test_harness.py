"""lm-evaluation-harness and the project give the same numbers on the same export and examples.

One real lm-eval run (its hf model on the tiny export, the task files written from conf/harness/) is shared by the
module; the project's side is the evaluate stage's own scoring on our GPT, with the tasks as conf/evaluate.yaml
configures them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline import PROJECT_ROOT
from pipeline.config import compose
from pipeline.errors import BadInput
from pipeline.evaluate.bias import bias_probe, pair_loglikelihoods, read_crows_pairs
from pipeline.evaluate.harness import (HARNESS_TASKS, SHIPPED, agreement, agreement_table, harness_check,
                                       piqa_dataset, project_crows, project_prompting, read_task_file, run_harness,
                                       write_tasks)
from pipeline.evaluate.prompting import evaluate_task, prompt_suite, read_piqa, read_sst2

LIMIT = 30


@pytest.fixture(scope="module")
def offline():
    """Nothing reaches the Hub while lm-eval, transformers and datasets run."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def data(data_dir):
    eval_dir = data_dir / "eval"
    return dict(sst2_path=eval_dir / "sst2" / "dev.tsv", piqa_path=eval_dir / "piqa" / "valid.jsonl",
                piqa_labels_path=eval_dir / "piqa" / "valid-labels.lst",
                crows_path=eval_dir / "crows_pairs" / "crows_pairs_anonymized.csv")


@pytest.fixture(scope="module")
def evaluate_cfg(data_dir):
    """The evaluate stage's real config, the harness comparing the first LIMIT examples."""
    return compose(f"paths.data_dir={data_dir}", f"evaluate.harness.limit={LIMIT}").evaluate


@pytest.fixture(scope="module")
def suites(evaluate_cfg):
    """The prompting tasks exactly as the evaluate stage builds them, the 0-shot one first."""
    suites = {name: prompt_suite(name, **dataclasses.asdict(t)) for name, t in evaluate_cfg.tasks.items()}
    for suite in suites.values():
        suite.tasks.sort(key=lambda task: task.shots)
    return suites


@pytest.fixture(scope="module")
def checked(tiny_export, evaluate_cfg, tmp_path_factory, offline):
    """The stage's check on the tiny export: the project's scores first (lm-eval is given the same examples), then
    one lm-eval run on SST-2, PIQA and CrowS-Pairs."""
    check = harness_check(evaluate_cfg, {"tiny": tiny_export.hf_dir, "bare": None},
                          tmp_path_factory.mktemp("harness"), "cpu")
    before = torch.get_rng_state()
    run = check.run("tiny", tiny_export.scored())
    assert torch.equal(torch.get_rng_state(), before), "lm-eval reseeded torch: later sampling would change"
    return check, run


@pytest.fixture(scope="module")
def compared(checked):
    return checked[1].project, checked[1].harness


def test_lm_eval_and_the_prompting_evaluation_agree(compared, suites, tiny_export, data):
    project, harness = compared
    model = tiny_export.scored()
    for name in ("sst2", "piqa"):
        a = agreement("tiny", project[name], harness[name])
        assert a.agrees, a.summary()
        assert a.harness == a.project and set(a.project) == {"acc", "acc_norm"}
        assert a.max_abs_loglik_diff <= 1e-4
        # The project's side is the prompting evaluation's: its evaluate_task ranking sums, and the stage's own
        # result (PIQA's normalised per token) reused as it is.
        task, examples = suites[name].tasks[0], suites[name].examples
        summed = dataclasses.replace(task, length_normalize=False)
        assert a.project["acc"] == evaluate_task(model, summed, examples, limit=LIMIT).accuracy
        stage_result = evaluate_task(model, task, examples, limit=LIMIT)
        assert project_prompting(model, task, examples, LIMIT, result=stage_result) == project[name]
        assert a.metrics()[f"harness/tiny/{name}/project_accuracy"] == a.project["acc"]
    sst2 = project["sst2"]
    assert sst2.indices == list(range(LIMIT)) and harness["sst2"].indices == sst2.indices
    first = read_sst2(data["sst2_path"])[0].fields["sentence"]
    assert harness["sst2"].contexts[0] == f"</s>Review: {first}\nSentiment:"
    assert harness["sst2"].continuations[0] == [" negative", " positive", " bad", " good"]

    # At a 64-token context some PIQA solutions cannot be scored: both sides leave out the same examples.
    piqa = read_piqa(data["piqa_path"], data["piqa_labels_path"])[:LIMIT]
    tokenizer = model.tokenizer
    fits = [i for i, e in enumerate(piqa) if all(len(tokenizer.encode(" " + c).ids) <= 64 for c in e.choices)]
    assert 0 < project["piqa"].skipped == LIMIT - len(fits) and harness["piqa"].indices == fits
    table = agreement_table([agreement("tiny", project[n], harness[n]) for n in ("sst2", "piqa")])
    assert table.count("| yes |") == 2 and "| tiny | piqa | " + str(len(fits)) + " |" in table


def test_the_comparison_would_see_another_prefix_or_prompt(compared, suites, tiny_export):
    """Scored after <s> (lm-eval's default BOS) the log-likelihoods differ well beyond the tolerance; a prompt
    that is not the task file's is refused."""
    project, harness = compared
    task, examples = suites["sst2"].tasks[0], suites["sst2"].examples
    after_bos = project_prompting(tiny_export.scored("<s>"), task, examples, LIMIT)
    mixed = dataclasses.replace(project["sst2"], loglikelihoods=after_bos.loglikelihoods)
    a = agreement("tiny", mixed, harness["sst2"])
    assert not a.agrees and a.max_abs_loglik_diff > 1e-2 and "DISAGREE" in a.summary()
    reworded = dataclasses.replace(task, template="Review: {sentence}\nFeeling:")
    with pytest.raises(BadInput, match=r"sst2, example 0: lm-eval's context .*Sentiment:.* differ .*Feeling:"):
        agreement("tiny", project_prompting(tiny_export.scored(), reworded, examples, LIMIT), harness["sst2"])
    with pytest.raises(BadInput, match="lm-eval scored 30 examples, the project 29"):
        agreement("tiny", project_prompting(tiny_export.scored(), task, examples[1:], LIMIT - 1), harness["sst2"])
    two_shot = evaluate_task(tiny_export.scored(), dataclasses.replace(task, shots=2), examples, limit=LIMIT)
    with pytest.raises(BadInput, match=r"the prompting result given \(sst2, 2-shot, 30 examples\) is not this task's"):
        project_prompting(tiny_export.scored(), task, examples, LIMIT, result=two_shot)


def test_crows_pairs_agrees_with_the_bias_probe(compared, tiny_export, data):
    project, harness = compared
    a = agreement("tiny", project["crows_pairs"], harness["crows_pairs"])
    assert a.agrees, a.summary()
    lls = harness["crows_pairs"].loglikelihoods
    assert a.harness["pct_stereotype"] == sum(more > less for more, less in lls) / len(lls)
    ours = pair_loglikelihoods(tiny_export.scored(), read_crows_pairs(data["crows_path"], LIMIT))
    assert max(abs(h - o) for hs, os in zip(lls, ours) for h, o in zip(hs, os)) <= 1e-4
    # The stage's bias probe on more pairs, reused for the first LIMIT: its scores (other batches: float noise).
    probe = bias_probe(tiny_export.scored(), read_crows_pairs(data["crows_path"], LIMIT + 10))
    reused = project_crows(tiny_export.scored(), read_crows_pairs(data["crows_path"], LIMIT), result=probe)
    assert reused.loglikelihoods == [[more, less] for _, more, less in probe.loglikelihoods[:LIMIT]]
    assert max(abs(r - o) for rs, os in zip(reused.loglikelihoods, project["crows_pairs"].loglikelihoods)
               for r, o in zip(rs, os)) < 1e-5
    with pytest.raises(BadInput, match=r"the bias result given has no scores for pairs \[10, 11, 12, 13, 14\]"):
        project_crows(tiny_export.scored(), read_crows_pairs(data["crows_path"], LIMIT),
                      result=bias_probe(tiny_export.scored(), read_crows_pairs(data["crows_path"], 10)))
    assert harness["crows_pairs"].contexts == [""] * LIMIT  # lm-eval's empty context, prefix_token_id before it
    assert set(a.metrics()) == {f"harness/tiny/crows_pairs/{k}" for k in
                                ("pct_stereotype", "project_pct_stereotype", "max_abs_loglik_diff", "n")}


def test_the_stage_check_reports_every_model(checked, tiny_export):
    check, run = checked
    assert [a.task for a in run.agreements] == ["sst2", "piqa", "crows_pairs"] and run.seconds > 0
    text, metrics = check.report([("tiny", run), ("bare", check.run("bare", tiny_export.scored()))], None)
    assert text.startswith("All 3 comparisons agree.") and "Not compared: bare (no transformers export)." in text
    assert metrics["harness/tiny/sst2/accuracy"] == run.harness["sst2"].metrics["acc"]
    assert metrics["harness/tiny/piqa/n"] == len(run.project["piqa"].indices) and "harness/tiny/seconds" in metrics
    assert not [k for k in metrics if k.startswith("harness/bare/")]


def test_task_files_read_the_whole_data_as_the_project_does(data, tmp_path, offline):
    import datasets

    include = write_tasks(tmp_path / "build", **data, prefix_token="<s>")
    specs = {p.stem: read_task_file(p) for p in include.glob("*.yaml")}
    assert set(specs) == set(HARNESS_TASKS.values())
    assert specs["sst2_local"]["description"] == "<s>" and "description" not in specs["crows_pairs_local"]
    assert specs["piqa_local"]["dataset_kwargs"]["labels_file"] == str(data["piqa_labels_path"].resolve())

    def rows(name: str):
        kwargs = specs[name]["dataset_kwargs"]
        [split] = datasets.load_dataset("csv", **kwargs).values()
        assert kwargs["cache_dir"].startswith(str(tmp_path))
        return split

    sst2 = read_sst2(data["sst2_path"])
    assert [(r["sentence"], r["label"]) for r in rows("sst2_local")] == [(e.fields["sentence"], e.label) for e in sst2]
    crows = read_crows_pairs(data["crows_path"])
    assert [(r["sent_more"], r["sent_less"]) for r in rows("crows_pairs_local")] == \
        [(p.sent_more, p.sent_less) for p in crows]
    piqa = piqa_dataset(str(data["piqa_path"]), str(data["piqa_labels_path"]), version=1.0)["validation"]
    assert [r["label"] for r in piqa] == [e.label for e in read_piqa(data["piqa_path"], data["piqa_labels_path"])]


def test_shipped_task_files_run_from_the_repository_root(data_dir):
    """``lm_eval --include_path conf/harness`` resolves data_files from the working directory: the repository root."""
    if data_dir != (PROJECT_ROOT.parent / "shared" / "data").resolve():
        pytest.skip("PIPELINE_DATA_DIR moves the data away from ../shared/data")
    for name in HARNESS_TASKS.values():
        kwargs = read_task_file(SHIPPED / f"{name}.yaml")["dataset_kwargs"]
        paths = [p for k, v in kwargs.items() if k in ("data_files", "labels_file")
                 for p in (v.values() if isinstance(v, dict) else [v])]
        assert paths and all(not p.startswith("/") and (PROJECT_ROOT / p).is_file() for p in paths), paths


def test_bad_input_names_the_file_and_what_is_wrong(data, data_dir, tmp_path, tiny_export):
    source = tmp_path / "source"
    source.mkdir()
    for name in HARNESS_TASKS.values():
        (source / f"{name}.yaml").write_text((SHIPPED / f"{name}.yaml").read_text())
    broken = source / "sst2_local.yaml"
    broken.write_text("\n".join(line for line in broken.read_text().splitlines() if not line.startswith("doc_to_text")))
    with pytest.raises(BadInput, match=r"sst2_local.yaml: field doc_to_text is missing"):
        write_tasks(tmp_path / "out", **data, source=source)
    with pytest.raises(BadInput, match=r"nowhere.tsv does not exist \(the data of harness task sst2_local, "):
        write_tasks(tmp_path / "out", **{**data, "sst2_path": tmp_path / "nowhere.tsv"})

    short = tmp_path / "labels.lst"
    short.write_text("0\n1\n")
    with pytest.raises(BadInput, match=r"valid.jsonl has \d+ lines but .*labels.lst has 2"):
        piqa_dataset(str(data["piqa_path"]), str(short))
    include = write_tasks(tmp_path / "ok", **data)
    with pytest.raises(BadInput, match="harness tasks \\['mmlu'\\]: expected some of sst2, piqa, crows_pairs"):
        run_harness(tiny_export.hf_dir, include, ["mmlu"], limit=5)
    with pytest.raises(BadInput, match="samples .* must name every task"):
        run_harness(tiny_export.hf_dir, include, ["sst2", "piqa"], samples={"sst2": [0]})
    with pytest.raises(BadInput, match="is not a transformers export"):
        run_harness(tmp_path, include, ["sst2"], limit=5)
    with pytest.raises(BadInput, match="evaluate.harness.tasks: 'nope' is not an evaluate.tasks entry"):
        harness_check(compose(f"paths.data_dir={data_dir}", "evaluate.harness.tasks=[nope]").evaluate, {}, tmp_path)
    no_bias = compose(f"paths.data_dir={data_dir}", "evaluate.bias.enabled=false", "evaluate.bias.path=null")
    with pytest.raises(BadInput, match="evaluate.harness.crows_pairs needs evaluate.bias.path"):
        harness_check(no_bias.evaluate, {}, tmp_path)


def test_the_task_files_contents_are_part_of_the_evaluate_config_hash(make_cfg):
    """Editing a shipped task file changes what lm-eval asks, so the stage's fingerprint holds each file's hash;
    with the harness off, none."""
    from pipeline.contract import stage_config
    from pipeline.files import file_hash
    from pipeline.stages import evaluate as stage

    on = stage.fingerprint(stage_config("evaluate", stage, make_cfg()))
    assert on == {str(p): file_hash(p) for p in sorted(SHIPPED.glob("*.yaml"))} and len(on) == 3
    assert stage.fingerprint(stage_config("evaluate", stage, make_cfg("evaluate.harness.enabled=false"))) == {}
