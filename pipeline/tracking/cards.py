"""Dataset and model cards: one Markdown page per stage output, every figure read from the manifests.

The data stages (filter, dedup, tokenize) get ``DATASET_CARD.md``: what the output is, its sources and their
licences, what each step kept and dropped, and how to rebuild it. The training stages (pretrain, cpt, sft,
dpo, merge) get a Hugging Face model card, ``README.md`` with YAML front matter, beside the weights a user
loads: ``hf/`` (a transformers export) or ``adapter/`` (a peft adapter, replacing the README peft writes).

A card states only what a manifest records: the stage's own (``manifest``), its direct upstream ones
(``upstream``, as the contract read them) and further back the manifests published in each input's ``dir``.
A figure the manifests lack is left out or said to be missing, never filled in. Integers are written with
thousands separators and other numbers to six significant digits (``fmt``), so a reader or a test can read
them back; the front matter holds the exact values.

Plain Python and a lazy ``yaml`` import: the contract imports this module for every stage.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

DATASET_CARD = "DATASET_CARD.md"
MODEL_CARD = "README.md"
DATA_STAGES = ("filter", "dedup", "tokenize")
MODEL_STAGES = ("pretrain", "cpt", "sft", "dpo", "merge")
NOT_STATED = "not stated"
NOT_RECORDED = "not recorded"
MODEL_LICENSE_NAME = "training-data-terms"  # license: other: the weights' terms are those of the data below
EVAL_SKIP = ("model/", "train/", "data/")  # metrics shown elsewhere in a model card (size, compute, data)

WHAT = {
    "filter": "Web documents extracted from crawl files, filtered by URL, language and quality rules, with "
              "personal data redacted.",
    "dedup": "The filter stage's documents with URL, exact and near duplicates and boilerplate lines removed.",
    "tokenize": "Documents encoded with a BPE tokenizer trained on them, as token shards split into train and "
                "validation.",
    "pretrain": "A small decoder-only transformer language model trained from scratch.",
    "cpt": "A language model continued-pretrained on domain text from the pretrain model.",
    "sft": "A LoRA adapter that instruction-tunes a base language model on chat-formatted examples.",
    "dpo": "A LoRA adapter preference-tuned with DPO on chosen and rejected reply pairs.",
    "merge": "The instruction-tuned model with its LoRA adapter folded into the weights.",
}


def write_card(stage: str, manifest: dict, build_dir: Path, upstream: Mapping[str, dict]) -> Optional[str]:
    """Write the stage's card into ``build_dir``; return its path relative to ``build_dir`` (for
    ``manifest['outputs']['card']``), or None for a stage that has no card (evaluate, scaling, tools)."""
    if stage in DATA_STAGES:
        relative, text = DATASET_CARD, dataset_card(manifest, lineage(manifest, upstream))
    elif stage in MODEL_STAGES:
        relative, text = model_card_path(manifest), model_card(manifest, lineage(manifest, upstream))
    else:
        return None
    path = Path(build_dir) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return relative


def model_card_path(manifest: dict) -> str:
    """Beside what a user loads: the transformers export, else the adapter, else the output's top folder."""
    outputs = manifest.get("outputs") or {}
    for key in ("hf", "adapter"):
        if isinstance(outputs.get(key), str):
            return f"{outputs[key]}/{MODEL_CARD}"
    return "MODEL_CARD.md"  # no export written (export: false): the card still belongs with the weights


# ---------------------------------------------------------------------------------------------------------------
# Lineage and sources


@dataclass
class Link:
    """An upstream stage output: its published manifest (None when it cannot be read) and what to say of it."""

    stage: str
    dir: str
    manifest: Optional[dict]
    note: str = ""


def lineage(manifest: dict, upstream: Mapping[str, dict]) -> list[Link]:
    """Every stage output ``manifest`` derives from, each once, furthest first (filter before dedup)."""
    order: list[Link] = []
    seen: set[str] = set()

    def visit(inputs: Mapping[str, dict], direct: bool) -> None:
        for name, entry in inputs.items():
            if name in seen:
                continue
            seen.add(name)
            link = resolve(name, entry, upstream.get(name) if direct else None)
            if link.manifest:
                visit(link.manifest.get("inputs") or {}, False)
            order.append(link)

    visit(manifest.get("inputs") or {}, True)
    return order


def resolve(stage: str, entry: Mapping[str, Any], given: Optional[dict]) -> Link:
    """A direct input's manifest as the contract read it; a further one from its published folder, with a note
    when it is missing or no longer the version the downstream stage read."""
    directory = str(entry.get("dir", ""))
    if given is not None:
        return Link(stage, directory, given)
    path = Path(directory) / "manifest.json"
    try:
        raw = path.read_bytes()
        found = json.loads(raw)
    except (OSError, ValueError):
        return Link(stage, directory, None, f"{path} could not be read: its figures are left out")
    note = ""
    if entry.get("manifest_sha256") and hashlib.sha256(raw).hexdigest() != entry["manifest_sha256"]:
        note = "republished since the downstream stage read it: its figures are those of the current output"
    return Link(stage, directory, found, note)


@dataclass
class Source:
    """One source a stage read: files (``path``) or another stage's output (``from_stage``)."""

    stage: str
    name: str
    path: Optional[str]
    license: Optional[str]
    from_stage: Optional[str] = None

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"


def sources(manifest: dict) -> list[Source]:
    """The sources in the stage's own config section (``<stage>.sources``; dedup's ``dedup.input``)."""
    stage = manifest.get("stage", "")
    section = (manifest.get("config") or {}).get(stage) or {}
    found = [Source(stage, name, spec.get("path"), spec.get("license"), spec.get("stage"))
             for name, spec in (section.get("sources") or {}).items()]
    read = section.get("input")
    if isinstance(read, Mapping) and (read.get("stage") or read.get("path")):
        found.append(Source(stage, "input", read.get("path"), read.get("license"), read.get("stage")))
    return found


def original_sources(source: Source, by_stage: Mapping[str, Link], depth: int = 0) -> Optional[list[Source]]:
    """The file sources behind a source that reads another stage's output (tokenize's web <- dedup <- filter);
    None when that stage is not in the lineage."""
    link = by_stage.get(source.from_stage or "")
    if link is None or link.manifest is None or depth > len(by_stage):
        return None
    found: list[Source] = []
    for upstream in sources(link.manifest):
        if upstream.from_stage:
            found.extend(original_sources(upstream, by_stage, depth + 1) or [])
        else:
            found.append(upstream)
    return found


def licence_text(source: Source, by_stage: Mapping[str, Link]) -> str:
    """A source's licence; for another stage's output, the licences of the files behind it."""
    if not source.from_stage:
        return source.license or NOT_STATED
    behind = original_sources(source, by_stage)
    if behind is None:
        return f"those of the {source.from_stage} stage's sources ({NOT_STATED} here)"
    if not behind:
        return NOT_STATED
    return "; ".join(f"{s.key}: {s.license or NOT_STATED}" for s in behind)


def all_file_sources(manifest: dict, links: list[Link]) -> list[Source]:
    """Every file source of the lineage and the stage itself, furthest first."""
    return [s for m in [link.manifest for link in links if link.manifest] + [manifest] for s in sources(m)
            if not s.from_stage]


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def fmt(value: Any) -> str:
    """A number as a card writes it: integers (and integral floats) with thousands separators, other numbers to six
    significant digits; None as 'not recorded'."""
    if value is None:
        return NOT_RECORDED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2 ** 53:
            return f"{int(value):,}"
        return f"{value:.6g}"
    return cell(str(value))


def cell(text: str) -> str:
    """Text that stays inside one table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def code(text: Any) -> str:
    """A path or identifier as inline code (globs keep their asterisks)."""
    return f"`{cell(str(text))}`" if text not in (None, "") else NOT_RECORDED


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """A Markdown table; numbers pass through ``fmt``, strings are taken as already formatted."""
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |")
    return "\n".join(lines)


def section(title: str, *parts: str) -> str:
    return "\n\n".join([f"## {title}", *[p for p in parts if p]])


def dig(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...`` or None where a level is missing."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def identity(manifest: dict) -> str:
    """Which run made this output: the facts that find it again (config hash, commit, MLflow run)."""
    rows = [("stage", code(manifest.get("stage"))), ("experiment", code(manifest.get("experiment"))),
            ("config hash", code(manifest.get("config_hash"))), ("git commit", code(manifest.get("git_commit"))),
            ("finished at", cell(str(manifest.get("finished_at", NOT_RECORDED)))),
            ("MLflow run", code(manifest.get("mlflow_run_id"))), ("wall time (s)", manifest.get("wall_time_s"))]
    return table(["", ""], rows)


def energy_section(manifest: dict) -> str:
    energy = manifest.get("energy")
    if "energy" not in manifest:
        return section("Energy", "Not recorded: the manifest predates energy tracking.")
    if not isinstance(energy, Mapping):
        return section("Energy", "Not measured: energy tracking was off for this run (`tracking.energy`), or "
                                 "codecarbon gave no reading.")
    intensity = energy.get("carbon_intensity_g_per_kwh")
    rows = [("energy (kWh)", energy.get("kwh")), ("emissions (kg CO2eq)", energy.get("co2_kg")),
            ("duration (s)", energy.get("duration_s")),
            ("power source", cell(str(energy.get("power_source", NOT_RECORDED))))]
    if "measured" in energy:
        rows.append(("read from power counters", energy["measured"]))
    rows += [("country", cell(str(energy.get("country", NOT_RECORDED)))),
             ("carbon intensity (g CO2eq/kWh)",
              intensity if intensity is not None else "codecarbon's figure for the country")]
    return section("Energy", "Measured with codecarbon while the stage ran (the stage's own work, not its "
                             "upstream stages').", table(["", ""], rows))


def reproduce_section(manifest: dict, extra: str = "") -> str:
    stage, experiment = manifest.get("stage"), manifest.get("experiment")
    commit = str(manifest.get("git_commit", "unknown"))
    code_note = (f"check out commit `{commit.removesuffix('-dirty')}` for the same code"
                 + (" (the tree had uncommitted changes then, so the code may differ)" if commit.endswith("-dirty")
                    else ""))
    text = (f"    make {stage} EXP={experiment}\n\n"
            f"rebuilds this output and, first, any upstream output that is out of date. The resolved config is in "
            f"`manifest.json` (hash `{manifest.get('config_hash')}`) and, with any `ARGS` overrides, in the MLflow "
            f"run's `config.yaml`; {code_note}.")
    return section("How to reproduce", text, extra)


def lineage_table(links: list[Link]) -> str:
    """One row per upstream stage output: its counts, sources with licences, and the run that made it."""
    by_stage = {link.stage: link for link in links}
    rows = []
    for link in links:
        m = link.manifest
        if m is None:
            rows.append([code(link.stage), code(link.dir), cell(link.note), "", ""])
            continue
        figures = "; ".join(f"{label}: {fmt(value)}" for label, value in summary(m))
        licences = "<br>".join(f"{cell(s.name)}: {cell(licence_text(s, by_stage))}" for s in sources(m)) or "none"
        note = f" ({cell(link.note)})" if link.note else ""
        rows.append([code(link.stage), code(link.dir) + note, figures or "", licences, code(m.get("config_hash"))])
    return table(["stage", "output", "counts", "sources: licence", "config hash"], rows)


SUMMARY = (  # (label, where): what a lineage row says of a stage, when its manifest has it
    ("documents in", ("counts", "input")), ("documents kept", ("counts", "kept")),
    ("documents rejected", ("counts", "rejected")), ("documents removed", ("counts", "removed")),
    ("train tokens", ("counts", "train", "tokens")), ("val tokens", ("counts", "val", "tokens")),
    ("domain train tokens", ("counts", "domain", "train", "tokens")), ("training steps", ("counts", "steps")),
    ("tokens trained", ("metrics", "train/tokens")), ("train examples", ("metrics", "data/train_examples")),
    ("train pairs", ("metrics", "data/train_pairs")), ("parameters", ("metrics", "merge/params")),
)


def summary(manifest: dict) -> list[tuple[str, Any]]:
    return [(label, value) for label, where in SUMMARY if (value := dig(manifest, *where)) is not None]


# ---------------------------------------------------------------------------------------------------------------
# Dataset cards


def dataset_card(manifest: dict, links: list[Link]) -> str:
    stage = manifest["stage"]
    body = {"filter": filter_sections, "dedup": dedup_sections, "tokenize": tokenize_sections}[stage](manifest, links)
    parts = [f"# Dataset card: {manifest.get('experiment')}/{stage}", WHAT[stage], identity(manifest),
             outputs_list(manifest), *body]
    if links:
        parts.append(section("Lineage", "The upstream outputs this dataset derives from, furthest first.",
                             lineage_table(links)))
    parts += [energy_section(manifest), reproduce_section(manifest)]
    return "\n\n".join(p for p in parts if p) + "\n"


def outputs_list(manifest: dict) -> str:
    """The files the stage wrote, as the manifest indexes them (strings and lists of paths only)."""
    lines = []
    for key, value in (manifest.get("outputs") or {}).items():
        if isinstance(value, str):
            lines.append(f"- {key}: {code(value)}")
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            lines.append(f"- {key}: " + ", ".join(code(v) for v in value))
    return section("Files", "\n".join(lines)) if lines else ""


def counts_table(rows: list[tuple[str, Any]]) -> str:
    return table(["", "documents"], [(label, value) for label, value in rows if value is not None])


def filter_sections(manifest: dict, links: list[Link]) -> list[str]:
    counts, metrics = manifest.get("counts") or {}, manifest.get("metrics") or {}
    config = dig(manifest, "config", "filter") or {}
    per_source = counts.get("per_source") or {}
    source_rows = []
    for s in sources(manifest):
        c = per_source.get(s.name) or {}
        source_rows.append([cell(s.name), code(s.path), cell(s.license or NOT_STATED), c.get("files"), c.get("input"),
                            c.get("kept"), c.get("rejected"), c.get("toxic_flagged")])
    kept_fraction = metrics.get("filter/kept_fraction")
    parts = [
        section("Sources", table(["source", "path", "licence", "files", "input", "kept", "rejected", "toxic flagged"],
                                 source_rows)),
        section("Counts", counts_table([("input", counts.get("input")), ("kept", counts.get("kept")),
                                        ("rejected", counts.get("rejected"))])
                + (f"\n\nKept fraction: {fmt(kept_fraction)}." if kept_fraction is not None else "")),
        funnel_section(counts, metrics),
        rules_section(counts, [s.name for s in sources(manifest)]),
        pii_section(counts, metrics, config),
        urls_section(counts, config),
        languages_section(manifest, config),
    ]
    return parts


def funnel_section(counts: dict, metrics: dict) -> str:
    """Documents left after each step, in the pipeline's order (counts.funnel, else the left_after metrics)."""
    funnel = counts.get("funnel") or {k[len("filter/left_after/"):]: v for k, v in metrics.items()
                                      if k.startswith("filter/left_after/")}
    steps = [(step, left) for step, left in funnel.items() if step != "input"]
    if not steps:
        return ""
    previous, rows = funnel.get("input", counts.get("input")), []
    for step, left in steps:
        known = all(isinstance(x, (int, float)) for x in (previous, left))
        rows.append([code(step), left, previous - left if known else NOT_RECORDED])
        previous = left
    return section("Funnel", "Documents left after each step, and how many the step dropped.",
                   table(["step", "documents left", "dropped by the step"], rows))


def rules_section(counts: dict, names: list[str]) -> str:
    total = counts.get("rejected_by_rule") or {}
    if not total:
        return ""
    per_source = counts.get("per_source") or {}
    rows = [[code(rule), n, *[(dig(per_source, name, "rejected_by_rule") or {}).get(rule, 0) for name in names]]
            for rule, n in total.items()]
    return section("Rejections by rule", "Each rejected document counts once, under the first rule that dropped it; "
                   "the rejected documents and their reasons are in `rejected/`.",
                   table(["rule", "documents", *[cell(n) for n in names]], rows))


def pii_section(counts: dict, metrics: dict, config: dict) -> str:
    if dig(config, "pii", "enabled") is False:
        return section("Personal data", "Redaction was off (`filter.pii.enabled: false`).")
    found = counts.get("pii_redacted")
    if found is None:
        found = {k[len("filter/pii_"):]: v for k, v in metrics.items() if k.startswith("filter/pii_")}
    text = "Replaced in the kept documents by a placeholder per kind." if found else \
        "No personal data matched the redaction patterns."
    return section("Personal data redacted", text,
                   table(["kind", "redactions"], [[code(kind), n] for kind, n in found.items()]) if found else "")


def urls_section(counts: dict, config: dict) -> str:
    urls = config.get("urls") or {}
    by_rule = counts.get("rejected_by_rule") or {}
    rows = []
    for kind, rule in (("opt-out", "urls.optout"), ("blocklist", "urls.blocklist")):
        listed = [*(urls.get(kind.replace("-", "")) or []), *(urls.get(f"{kind.replace('-', '')}_files") or [])]
        rows.append([f"{kind} domains and files (config)", cell(", ".join(map(str, listed))) or "none"])
        rows.append([f"documents dropped by the {kind}", by_rule.get(rule, 0)])
    if urls.get("enabled") is False:
        return section("Opt-outs and blocklist", "The URL step was off (`filter.urls.enabled: false`).")
    return section("Opt-outs and blocklist", "Documents from domains whose owners opted out of training, and from "
                   "blocklisted domains, are dropped.", table(["", ""], rows))


def languages_section(manifest: dict, config: dict) -> str:
    """Documents per language where the manifest counts them (never guessed), and the language filter's setting."""
    stage = manifest["stage"]
    counted = dig(manifest, "counts", "languages") or {
        k.rsplit("/", 1)[1]: v for k, v in (manifest.get("metrics") or {}).items()
        if k.startswith((f"{stage}/lang/", f"{stage}/languages/"))}
    langid = config.get("langid") or {}
    parts = []
    if counted:
        parts.append(table(["language", "documents"], [[code(lang), n] for lang, n in counted.items()]))
    if langid.get("enabled") and langid.get("languages"):
        parts.append(f"The language filter keeps {', '.join(code(x) for x in langid['languages'])} with a "
                     f"normalised score of at least {fmt(langid.get('min_score'))} (config).")
    return section("Languages", *parts) if parts else ""


def dedup_sections(manifest: dict, links: list[Link]) -> list[str]:
    counts, metrics = manifest.get("counts") or {}, manifest.get("metrics") or {}
    by_stage = {link.stage: link for link in links}
    source_rows = [[cell(s.name), f"the {code(s.from_stage)} stage's kept documents" if s.from_stage else code(s.path),
                    cell(licence_text(s, by_stage))] for s in sources(manifest)]
    levels = counts.get("removed_by_level") or {}
    kept_fraction = metrics.get("dedup/kept_fraction")
    parts = [
        section("Sources", table(["source", "reads", "licence"], source_rows)),
        section("Counts", counts_table([("input", counts.get("input")), ("kept", counts.get("kept")),
                                        ("removed", counts.get("removed"))])
                + (f"\n\nKept fraction: {fmt(kept_fraction)}." if kept_fraction is not None else "")),
    ]
    if levels:
        parts.append(section("Removed by level", "Each removed document counts once, at the first level that "
                             "removed it; the removed documents are in `removed/`.",
                             table(["level", "documents"], [[code(k), v] for k, v in levels.items()])))
    lines = counts.get("lines") or {}
    if lines:
        parts.append(section("Boilerplate lines", table(["", "lines"], [[code(k), v] for k, v in lines.items()])))
    evaluation = counts.get("near_eval") or {}
    sets = [(name, evaluation[name]) for name in ("overall", "real", "planted_pairs")
            if isinstance(evaluation.get(name), Mapping)]
    if sets:
        parts.append(section("Near-duplicate detection, measured",
                             f"Pairs found among {fmt(evaluation.get('documents'))} documents with "
                             f"{fmt(evaluation.get('planted'))} planted near copies.",
                             table(["pairs", "true", "detected", "precision", "recall"],
                                   [[code(name), s.get("true_pairs"), s.get("detected_pairs"), s.get("precision"),
                                     s.get("recall")] for name, s in sets])))
    return parts


def tokenize_sections(manifest: dict, links: list[Link]) -> list[str]:
    counts, metrics = manifest.get("counts") or {}, manifest.get("metrics") or {}
    by_stage = {link.stage: link for link in links}
    per_source = counts.get("per_source") or {}
    source_rows = []
    for s in sources(manifest):
        c = per_source.get(s.name) or {}
        source_rows.append([cell(s.name), f"the {code(s.from_stage)} stage's output" if s.from_stage else code(s.path),
                            cell(licence_text(s, by_stage)), dig(c, "train", "documents"), dig(c, "train", "tokens"),
                            dig(c, "val", "documents"), dig(c, "val", "tokens")])
    splits = [(name, counts[name]) for name in ("train", "val", "empty") if isinstance(counts.get(name), Mapping)]
    kept = sum(dig(counts, n, "documents") or 0 for n in ("train", "val"))
    vocab = dig(counts, "vocab_size", "actual") or metrics.get("tokenize/vocab_size")
    return [
        section("Sources", table(["source", "reads", "licence", "train documents", "train tokens", "val documents",
                                  "val tokens"], source_rows)),
        section("Counts", counts_table([("input", counts.get("documents_in")), ("kept", kept if splits else None),
                                        ("rejected (empty)", dig(counts, "empty", "documents"))]),
                table(["split", "documents", "tokens", "bytes"],
                      [[code(name), c.get("documents"), c.get("tokens"), c.get("bytes")] for name, c in splits])
                if splits else "",
                f"Vocabulary: {fmt(vocab)} tokens; {fmt(metrics.get('tokenize/val_bytes_per_token'))} bytes per token "
                f"on the validation split." if vocab is not None else ""),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Model cards


def model_card(manifest: dict, links: list[Link]) -> str:
    stage = manifest["stage"]
    adapter = "adapter" in (manifest.get("outputs") or {})
    parts = [
        front_matter(manifest, links, adapter),
        f"# {manifest.get('experiment')}/{stage}",
        f"{WHAT[stage]} Built by this project's `{stage}` stage, a tiny model for research and demonstration.",
        identity(manifest),
        model_section(manifest, links, adapter),
        training_section(manifest, links),
        section("Training data", "Each stage back to the raw sources, furthest first, with its counts and the "
                "licences of its sources.", lineage_table(links) if links else "No upstream stage."),
        own_sources_section(manifest),
        licence_section(manifest, links),
        energy_section(manifest),
        evaluation_section(manifest),
        intended_use_section(manifest),
        limits_section(manifest, links),
        reproduce_section(manifest, load_hint(manifest, adapter)),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def config_licence(manifest: dict) -> Optional[str]:
    """A licence the stage's config chooses for its model (``<stage>.license``), if any."""
    return dig(manifest, "config", manifest.get("stage", ""), "license")


def front_matter(manifest: dict, links: list[Link], adapter: bool) -> str:
    import yaml

    stage = manifest["stage"]
    chosen = config_licence(manifest)
    meta: dict[str, Any] = {"license": chosen} if chosen else {"license": "other", "license_name": MODEL_LICENSE_NAME}
    meta["library_name"] = "peft" if adapter else "transformers"
    meta["pipeline_tag"] = "text-generation"
    tags = ("causal-lm", "tiny", "research-demo", manifest.get("experiment"), stage, "lora" if adapter else None)
    meta["tags"] = list(dict.fromkeys(t for t in tags if t))
    names = [s.key for s in all_file_sources(manifest, links)]
    if names:
        meta["datasets"] = list(dict.fromkeys(names))
    results = [{"name": key, "type": key.split("/", 1)[1], "value": value}
               for key, value in (manifest.get("metrics") or {}).items()
               if key.startswith("val/") and isinstance(value, (int, float))]
    if results:
        meta["model-index"] = [{"name": f"{manifest.get('experiment')}-{stage}", "results": [{
            "task": {"type": "text-generation", "name": "Causal language modeling"},
            "dataset": {"name": f"{stage} validation split", "type": f"{manifest.get('experiment')}/{stage}"},
            "metrics": results}]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def base_manifest(manifest: dict, links: list[Link]) -> Optional[dict]:
    """The manifest of the model an adapter (or merge) builds on, back to one with a model_config."""
    by_stage = {link.stage: link.manifest for link in links if link.manifest}
    current, seen = manifest, set()
    while current is not None and not dig(current, "outputs", "model_config"):
        base = dig(current, "outputs", "base", "stage")
        if not base or base in seen:
            return None
        seen.add(base)
        current = by_stage.get(base)
    return current


def model_section(manifest: dict, links: list[Link], adapter: bool) -> str:
    metrics = manifest.get("metrics") or {}
    stage = manifest["stage"]
    holder = base_manifest(manifest, links)
    config = dig(holder, "outputs", "model_config") or {}
    where = "" if holder is manifest else f" (the architecture of the {code(holder['stage'])} base)" if holder else ""
    rows = [("architecture", code(config.get("block"))), ("layers", config.get("n_layer")),
            ("attention heads", config.get("n_head")), ("model width (d_model)", config.get("d_model")),
            ("feed-forward width", config.get("d_ff")), ("context (tokens)", config.get("context")),
            ("vocabulary (tokens)", config.get("vocab_size")),
            ("parameters (N)", metrics.get("model/params", metrics.get(f"{stage}/params"))),
            ("non-embedding parameters", metrics.get("model/non_embedding_params"))]
    rows = [(label, value) for label, value in rows if value not in (None, NOT_RECORDED) or "parameters" in label]
    parts = [f"A decoder-only transformer{where}.", table(["", ""], rows)]
    if adapter:
        parts.append(adapter_table(manifest))
    return section("Model", *parts)


def adapter_table(manifest: dict) -> str:
    lora = dig(manifest, "outputs", "lora") or {}
    metrics, stage = manifest.get("metrics") or {}, manifest["stage"]
    base = dig(manifest, "outputs", "base") or {}
    rows = [("adapter", "LoRA (peft)"), ("base model", f"the {code(base.get('stage'))} stage's model "
                                                      f"({code(base.get('path'))})" if base else NOT_RECORDED),
            ("rank", lora.get("rank")), ("alpha", lora.get("alpha")), ("dropout", lora.get("dropout")),
            ("target modules", ", ".join(code(t) for t in lora.get("targets") or []) or NOT_RECORDED),
            ("trainable token rows", ", ".join(fmt(t) for t in lora.get("tokens") or []) or "none"),
            ("trainable parameters", metrics.get(f"{stage}/trainable_params")),
            ("trainable fraction", metrics.get(f"{stage}/trainable_fraction"))]
    return table(["adapter", ""], rows)


def compute(manifest: dict) -> tuple[Any, Any, str]:
    """(D tokens trained, C FLOPs, how C was found) for one training stage's manifest."""
    metrics = manifest.get("metrics") or {}
    tokens, flops = metrics.get("train/tokens"), metrics.get("train/flops")
    if flops is not None:
        for which, key in (("non-embedding", "model/non_embedding_params"), ("all", "model/params")):
            if tokens is not None and metrics.get(key) is not None and flops == 6 * metrics[key] * tokens:
                return tokens, flops, f"logged by the stage: 6·N·D with N the {which} parameters"
        return tokens, flops, "logged by the stage (train/flops)"
    n = metrics.get("model/non_embedding_params", metrics.get("model/params"))
    if tokens is None or n is None:
        return tokens, None, NOT_RECORDED
    which = "non-embedding" if "model/non_embedding_params" in metrics else "all"
    return tokens, 6 * n * tokens, f"computed here as 6·N·D with N the {which} parameters (no train/flops logged)"


def training_section(manifest: dict, links: list[Link]) -> str:
    counts = manifest.get("counts") or {}
    tokens, flops, how = compute(manifest)
    if tokens is None:
        own = (f"The `{manifest['stage']}` stage trains nothing itself (no `train/tokens` in its manifest); the "
               f"compute is that of the stages it derives from.")
    else:
        rows = [("steps", counts.get("steps")), ("tokens trained (D)", tokens), ("compute (C, FLOPs)", flops),
                ("how C was found", how), ("resumed from", cell(str(counts.get("resumed_from") or "no")))]
        own = table(["", ""], rows)
    return section("Training", own, lineage_compute(manifest, links))


def lineage_compute(manifest: dict, links: list[Link]) -> str:
    """Tokens, FLOPs and energy of every training stage behind this model, and their totals."""
    chain = [link.manifest for link in links if link.manifest] + [manifest]
    rows, totals = [], {"tokens": 0, "flops": 0, "kwh": 0.0}
    complete = {"flops": True, "kwh": True}
    for m in chain:
        tokens, flops, how = compute(m)
        if tokens is None:
            continue
        kwh = dig(m, "energy", "kwh")
        rows.append([code(m.get("stage")), dig(m, "counts", "steps"), tokens, flops,
                     kwh if kwh is not None else "not measured"])
        totals["tokens"] += tokens
        for key, value in (("flops", flops), ("kwh", kwh)):
            if value is None:
                complete[key] = False
            else:
                totals[key] += value
    if len(rows) < 2:
        return ""
    rows.append(["**total**", "", totals["tokens"], totals["flops"] if complete["flops"] else "incomplete",
                 totals["kwh"] if complete["kwh"] else "incomplete"])
    return "### Across the lineage\n\n" + table(["stage", "steps", "tokens trained", "FLOPs", "energy (kWh)"], rows)


def own_sources_section(manifest: dict) -> str:
    """The stage's own sources, with what it read, kept and dropped of each (its ``data/<source>/*`` metrics)."""
    found = [s for s in sources(manifest) if not s.from_stage]
    if not found:
        return ""
    metrics = manifest.get("metrics") or {}
    fields = list(dict.fromkeys(k.rsplit("/", 1)[1] for s in found for k in metrics
                                if k.startswith(f"data/{s.name}/") and k.count("/") == 2))
    rows = [[cell(s.name), code(s.path), cell(s.license or NOT_STATED),
             *[metrics.get(f"data/{s.name}/{f}", NOT_RECORDED) for f in fields]] for s in found]
    return section("This stage's data", table(["source", "path", "licence", *[f.replace("_", " ") for f in fields]],
                                              rows))


def licence_section(manifest: dict, links: list[Link]) -> str:
    chosen = config_licence(manifest)
    by_licence: dict[str, list[str]] = {}
    for s in all_file_sources(manifest, links):
        by_licence.setdefault(s.license or NOT_STATED, []).append(s.key)
    if chosen:
        head = f"The config gives the weights the licence `{cell(chosen)}`."
    else:
        head = ("No licence was chosen for the weights (`license: other`, "
                f"`license_name: {MODEL_LICENSE_NAME}`): the licences of the training data do not make a model "
                "licence, and the weights may be bound by the terms of every source below, the most restrictive "
                "included.")
    rows = [[cell(licence), ", ".join(code(k) for k in dict.fromkeys(keys))] for licence, keys in by_licence.items()]
    return section("Licence", head, table(["licence", "sources"], rows) if rows else "")


def evaluation_section(manifest: dict) -> str:
    rows = [[code(k), v] for k, v in (manifest.get("metrics") or {}).items()
            if not k.startswith(EVAL_SKIP) and isinstance(v, (int, float))]
    if not rows:
        return section("Evaluation", "The stage logged no evaluation metrics; see the `evaluate` stage.")
    return section("Evaluation", "The stage's own measurements at the end of training (`val*` on its held-out split, "
                   "`before*` on the same split before this stage); the `evaluate` stage compares the models on "
                   "common sets.", table(["metric", "value"], rows))


def intended_use_section(manifest: dict) -> str:
    return section("Intended use", "A tiny model for research and demonstration of the pipeline: checking that "
                   "the stages, tracking and evaluation work end to end, and comparing runs with each other. It is "
                   "not meant to answer questions, write code or text for anyone, or be deployed.")


def limits_section(manifest: dict, links: list[Link]) -> str:
    chain = [link.manifest for link in links if link.manifest] + [manifest]
    holder = base_manifest(manifest, links) or {}
    config = dig(holder, "outputs", "model_config") or {}
    metrics = manifest.get("metrics") or {}
    params = metrics.get("model/params", metrics.get(f"{manifest['stage']}/params"))
    items = [f"Tiny: {fmt(params)} parameters and a context of {fmt(config.get('context'))} tokens; expect unreliable, "
             f"often incoherent text."]
    languages = [lang for m in chain if m.get("stage") == "filter"
                 for lang in dig(m, "config", "filter", "langid", "languages") or []]
    if languages:
        items.append(f"Web text filtered to {', '.join(code(x) for x in languages)} only, plus the other sources "
                     f"listed; other languages and dialects are barely represented.")
    dpo = next((m for m in chain if m.get("stage") == "dpo"), None)
    if dpo is None:
        items.append("Not safety-tuned: no preference tuning or harmlessness training is in its lineage; it can "
                     "repeat toxic, biased or false text from its web data.")
    else:
        names = ", ".join(code(s.name) for s in sources(dpo))
        items.append(f"Preference-tuned only by the `dpo` stage on {names} pairs (harmlessness and helpfulness "
                     f"preferences) at this tiny scale: not a safety guarantee; it can still repeat toxic, biased or "
                     f"false text.")
    items.append("The metrics above come from held-out splits of the training sources, not from independent "
                 "benchmarks.")
    return section("Known limits", "\n".join(f"- {item}" for item in items))


def load_hint(manifest: dict, adapter: bool) -> str:
    if adapter:
        return ("This folder holds a LoRA adapter (peft) for the base model named above, not a full model; "
                "`pipeline.sft.lora.load_adapter(base_model, folder)` applies it, and the `merge` stage folds an "
                "adapter into a plain model with a transformers export.")
    return ("Load the export with transformers: `AutoModelForCausalLM.from_pretrained(folder)` and "
            "`AutoTokenizer.from_pretrained(folder)`, where `folder` is this one.")
