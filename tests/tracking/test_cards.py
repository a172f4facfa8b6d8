"""Dataset and model cards written from real manifests: every figure in a card reads back equal to the manifest's."""
from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import compose
from pipeline.tracking.cards import NOT_STATED, fmt, lineage, write_card
from tests.conftest import tiny_filter_overrides, tiny_tokenize_overrides

ENERGY = {"kwh": 0.000123456, "co2_kg": 4.56e-05, "duration_s": 12.5, "measured": False, "country": "USA",
          "power_source": "CPU: TDP x load estimate (no RAPL counters); RAM: size estimate",
          "carbon_intensity_g_per_kwh": 369.47}

# filter -> dedup -> tokenize (web read from dedup) -> pretrain -> sft (LoRA on the pretrain model), each tiny
CHAIN = [
    *tiny_filter_overrides(), "filter.sources.ccnet.license=null", "dedup.eval.enabled=false",
    "tokenize.sources.web.stage=dedup", "tokenize.sources.web.path=null",
    "model=tiny", "pretrain.max_steps=4", "pretrain.micro_batch_size=4", "pretrain.eval_every_steps=2",
    "pretrain.eval_windows=4", "pretrain.sample_every_steps=0", "pretrain.ckpt_every_steps=2",
    "pretrain.optim.warmup_steps=1",
    "sft.init.stage=pretrain", "~sft.sources.p3", "~sft.sources.gsm8k", "~sft.sources.codealpaca",
    "sft.max_steps=4", "sft.micro_batch_size=4", "sft.eval_every_steps=2", "sft.ckpt_every_steps=2",
    "sft.optim.warmup_steps=1", "sft.val_max_per_source=8", "sft.generate.per_source=1",
    "sft.generate.max_new_tokens=4",
]


@pytest.fixture(scope="module")
def published(tmp_path_factory, tracking_uri, data_dir) -> dict[str, dict]:
    """The published manifests of one tiny run of the chain, by stage."""
    from pipeline.contract import execute_stage
    from pipeline.stages import load_stage

    out = tmp_path_factory.mktemp("cards")
    cfg = compose(f"paths.outputs_dir={out}", f"tracking.uri={tracking_uri}", "tracking.experiment=cards",
                  *tiny_tokenize_overrides(data_dir), "tokenizer.vocab_size=512", *CHAIN)
    return {stage: execute_stage(stage, load_stage(stage), cfg)
            for stage in ("filter", "dedup", "tokenize", "pretrain", "sft")}


def card_of(stage: str, published: dict, build_dir: Path, **changes) -> tuple[str, str, dict]:
    """Write ``stage``'s card from its published manifest (plus ENERGY and ``changes``) into ``build_dir``: the card's
    relative path, its text and the manifest it was written from."""
    manifest = {**copy.deepcopy(published[stage]), "energy": ENERGY, **changes}
    upstream = {name: published[name] for name in manifest["inputs"]}
    relative = write_card(stage, manifest, build_dir, upstream)
    return relative, (build_dir / relative).read_text(), manifest


def table(card: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table under ``heading`` (or of the table whose header line it is), as cells
    without backticks."""
    lines = card.splitlines()
    assert heading in lines, f"no '{heading}' in the card"
    rows: list[list[str]] = []
    start = lines.index(heading) + (0 if heading.startswith("|") else 1)  # a heading, or the table's own header
    for line in lines[start:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([c.strip().strip("`").replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
        elif rows:
            break
    return rows[2:]


def pairs(card: str, heading: str) -> dict[str, str]:
    return {row[0]: row[1] for row in table(card, heading)}


def number(text: str) -> float:
    return float(text.replace(",", ""))


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:100]
    return yaml.safe_load(card.split("---\n")[1])


def check_energy(card: str) -> None:
    energy = pairs(card, "## Energy")
    assert number(energy["energy (kWh)"]) == pytest.approx(ENERGY["kwh"], rel=1e-5)
    assert number(energy["emissions (kg CO2eq)"]) == pytest.approx(ENERGY["co2_kg"], rel=1e-5)
    assert number(energy["carbon intensity (g CO2eq/kWh)"]) == pytest.approx(ENERGY["carbon_intensity_g_per_kwh"])
    assert energy["power source"] == ENERGY["power_source"] and energy["read from power counters"] == "no"


@pytest.mark.slow
def test_filter_card_reads_back_every_count_of_the_manifest(published, tmp_path):
    relative, card, m = card_of("filter", published, tmp_path)
    assert relative == "DATASET_CARD.md" and (tmp_path / relative).is_file()
    counts = m["counts"]
    assert {k: number(v) for k, v in pairs(card, "## Counts").items()} == \
        {k: counts[k] for k in ("input", "kept", "rejected")}

    rules = table(card, "## Rejections by rule")
    names = list(m["config"]["filter"]["sources"])
    assert {row[0]: number(row[1]) for row in rules} == counts["rejected_by_rule"]
    for row in rules:
        assert [number(c) for c in row[2:]] == \
            [counts["per_source"][n]["rejected_by_rule"].get(row[0], 0) for n in names], row
    assert {k: number(v) for k, v in pairs(card, "## Funnel").items()} == \
        {k: v for k, v in counts["funnel"].items() if k != "input"}
    assert counts["pii_redacted"], "the tiny crawl has addresses to redact"
    assert {k: number(v) for k, v in pairs(card, "## Personal data redacted").items()} == counts["pii_redacted"]
    urls = pairs(card, "## Opt-outs and blocklist")
    assert number(urls["documents dropped by the opt-out"]) == counts["rejected_by_rule"]["urls.optout"] > 0
    assert urls["opt-out domains and files (config)"] == ", ".join(m["config"]["filter"]["urls"]["optout"])

    sources = {row[0]: row for row in table(card, "## Sources")}
    assert sources["warc"][2] == m["config"]["filter"]["sources"]["warc"]["license"]
    assert sources["ccnet"][2] == NOT_STATED, "a source without a licence says so"
    assert number(sources["html"][5]) == counts["per_source"]["html"]["kept"]
    assert "## Languages" in card and "| language |" not in card, "no per-language counts in the manifest: none shown"
    check_energy(card)
    assert "    make filter EXP=demo" in card and m["config_hash"] in card


@pytest.mark.slow
def test_dedup_and_tokenize_cards_trace_licences_back_to_the_filter_sources(published, tmp_path):
    filter_sources = published["filter"]["config"]["filter"]["sources"]
    warc = f"filter/warc: {filter_sources['warc']['license']}"

    _, card, m = card_of("dedup", published, tmp_path / "dedup")
    assert {k: number(v) for k, v in pairs(card, "## Removed by level").items()} == m["counts"]["removed_by_level"]
    assert {k: number(v) for k, v in pairs(card, "## Counts").items()} == \
        {k: m["counts"][k] for k in ("input", "kept", "removed")}
    (source,) = table(card, "## Sources")
    assert warc in source[2] and f"filter/ccnet: {NOT_STATED}" in source[2]
    (row,) = table(card, "## Lineage")
    assert row[0] == "filter" and f"documents kept: {published['filter']['counts']['kept']:,}" in row[2]

    _, card, m = card_of("tokenize", published, tmp_path / "tokenize")
    per_source = m["counts"]["per_source"]
    for name, _, licence, train_docs, train_tokens, val_docs, val_tokens in table(card, "## Sources"):
        assert [number(train_docs), number(train_tokens), number(val_docs), number(val_tokens)] == \
            [per_source[name][s][k] for s in ("train", "val") for k in ("documents", "tokens")], name
        spec = m["config"]["tokenize"]["sources"][name]
        assert (warc in licence) if spec["stage"] == "dedup" else licence == (spec["license"] or NOT_STATED), name
    splits = {row[0]: [number(c) for c in row[1:]] for row in table(card, "| split | documents | tokens | bytes |")}
    assert splits["train"] == [m["counts"]["train"][k] for k in ("documents", "tokens", "bytes")]
    assert splits["val"] == [m["counts"]["val"][k] for k in ("documents", "tokens", "bytes")]
    assert [row[0] for row in table(card, "## Lineage")] == ["filter", "dedup"], "furthest first"
    check_energy(card)


@pytest.mark.slow
def test_pretrain_model_card_front_matter_and_figures(published, tmp_path):
    relative, card, m = card_of("pretrain", published, tmp_path / "a")
    assert relative == "hf/README.md"
    meta = front_matter(card)
    assert meta["license"] == "other" and meta["license_name"] and meta["library_name"] == "transformers"
    assert meta["datasets"] == ["filter/warc", "filter/html", "filter/ccnet", "tokenize/shakespeare"]
    (result,) = meta["model-index"][0]["results"]
    assert {r["name"]: r["value"] for r in result["metrics"]} == \
        {k: v for k, v in m["metrics"].items() if k.startswith("val/")}, "exact values in the front matter"

    metrics, config = m["metrics"], m["outputs"]["model_config"]
    model = pairs(card, "## Model")
    assert number(model["parameters (N)"]) == metrics["model/params"]
    assert number(model["non-embedding parameters"]) == metrics["model/non_embedding_params"]
    assert [number(model[k]) for k in ("layers", "attention heads", "model width (d_model)", "context (tokens)",
                                       "vocabulary (tokens)")] == \
        [config[k] for k in ("n_layer", "n_head", "d_model", "context", "vocab_size")]
    training = pairs(card, "## Training")
    assert number(training["steps"]) == m["counts"]["steps"]
    assert number(training["tokens trained (D)"]) == metrics["train/tokens"]
    assert number(training["compute (C, FLOPs)"]) == metrics["train/flops"]
    assert "non-embedding" in training["how C was found"]
    evaluation = pairs(card, "## Evaluation")
    for key in ("val/loss", "val/ppl", "val/bpb"):
        assert number(evaluation[key]) == pytest.approx(metrics[key], rel=1e-5)
    assert [row[0] for row in table(card, "## Training data")] == ["filter", "dedup", "tokenize"]
    check_energy(card)

    # no train/flops: C = 6 N D, computed and said so
    no_flops = {k: v for k, v in metrics.items() if k != "train/flops"}
    _, card, _ = card_of("pretrain", published, tmp_path / "b", metrics=no_flops)
    training = pairs(card, "## Training")
    assert number(training["compute (C, FLOPs)"]) == 6 * metrics["model/non_embedding_params"] * metrics["train/tokens"]
    assert training["how C was found"].startswith("computed here")

    # no transformers export: the card still goes with the weights; a licence in the config is taken as given
    outputs = {k: v for k, v in m["outputs"].items() if k != "hf"}
    chosen = {**m["config"], "pretrain": {**m["config"]["pretrain"], "license": "apache-2.0"}}
    relative, card, _ = card_of("pretrain", published, tmp_path / "c", outputs=outputs, config=chosen, energy=None)
    assert relative == "MODEL_CARD.md"
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and "license_name" not in meta
    assert "Not measured" in card.split("## Energy")[1].split("##")[0]


@pytest.mark.slow
def test_sft_adapter_card_replaces_peft_readme(published, tmp_path, data_dir):
    sft = published["sft"]
    adapter = Path(sft["inputs"]["pretrain"]["dir"]).parent / "sft" / sft["outputs"]["adapter"]
    shutil.copytree(adapter, tmp_path / "adapter")  # a build folder holding peft's files
    (tmp_path / "adapter" / "README.md").write_text("---\nlibrary_name: peft\n---\n[More Information Needed]\n")
    relative, card, m = card_of("sft", published, tmp_path)
    assert relative == "adapter/README.md" and "[More Information Needed]" not in card
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert {"sft/oasst", "sft/self_instruct", "filter/warc"} <= set(meta["datasets"])

    base = published["pretrain"]
    model = pairs(card, "## Model")
    assert number(model["layers"]) == base["outputs"]["model_config"]["n_layer"], "the base model's architecture"
    assert number(model["parameters (N)"]) == m["metrics"]["model/params"]
    lora = pairs(card, "| adapter |  |")
    assert number(lora["rank"]) == m["outputs"]["lora"]["rank"]
    assert number(lora["trainable parameters"]) == m["metrics"]["sft/trainable_params"]
    data = {row[0]: row for row in table(card, "## This stage's data")}
    assert data["oasst"][2] == m["config"]["sft"]["sources"]["oasst"]["license"]
    header = card.split("## This stage's data")[1].split("\n")[2]
    column = [c.strip() for c in header.strip("|").split("|")].index("train examples")
    assert number(data["oasst"][column]) == m["metrics"]["data/oasst/train_examples"]
    total = table(card, "### Across the lineage")[-1]
    assert number(total[2]) == base["metrics"]["train/tokens"] + m["metrics"]["train/tokens"]
    assert number(total[3]) == base["metrics"]["train/flops"] + m["metrics"]["train/flops"]
    assert "Not safety-tuned" in card


@pytest.mark.parametrize("stage", ["evaluate", "scaling", "dedup_eval"])
def test_a_stage_without_a_card_writes_nothing(stage, tmp_path):
    assert write_card(stage, {"stage": stage, "inputs": {}, "metrics": {}}, tmp_path, {}) is None
    assert not any(tmp_path.iterdir())


def test_lineage_reads_further_manifests_from_disk_and_says_when_one_changed(tmp_path):
    def publish(stage: str, inputs: dict) -> dict:
        (tmp_path / stage).mkdir()
        path = tmp_path / stage / "manifest.json"
        path.write_text(json.dumps({"stage": stage, "inputs": inputs}))
        return {"dir": str(tmp_path / stage), "manifest_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    filtered = publish("filter", {})
    deduped = publish("dedup", {"filter": {**filtered, "manifest_sha256": "0" * 64}})  # filter rebuilt since
    tokenized = {"tokenize": publish("tokenize", {"dedup": deduped, "gone": {"dir": str(tmp_path / "gone")}})}
    links = lineage({"stage": "pretrain", "inputs": tokenized},
                    {"tokenize": json.loads((tmp_path / "tokenize" / "manifest.json").read_text())})
    assert [link.stage for link in links] == ["filter", "dedup", "gone", "tokenize"]
    by_stage = {link.stage: link for link in links}
    assert "republished" in by_stage["filter"].note and not by_stage["dedup"].note
    assert by_stage["gone"].manifest is None and "could not be read" in by_stage["gone"].note


def test_numbers_are_written_so_they_read_back():
    assert fmt(1334016) == "1,334,016" and fmt(5849166643200.0) == "5,849,166,643,200"
    for value in (5.396068439483643, 1.589e-05, 0.2633, 220.53765239796195):
        assert number(fmt(value)) == pytest.approx(value, rel=1e-5)
    assert fmt(None) == "not recorded" and fmt(True) == "yes" and fmt("a|b") == "a\\|b"
