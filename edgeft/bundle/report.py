"""report.md: the build's facts, every artifact's drift, latency and footprint, the search's candidates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeft import formats
from edgeft.bundle.records import ArtifactResult, BuildFacts, artifact_name
from edgeft.footprint import TensorTypes
from edgeft.targets import ArtifactSpec, TargetProfile


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _variant(spec: ArtifactSpec) -> str:
    level = "" if spec.accuracy_level is None else f" (accuracy_level {spec.accuracy_level})"
    return level + ("" if spec.ship else " — compared, not shipped")


def render_report(
    target: TargetProfile,
    facts: BuildFacts,
    arts: list[ArtifactResult],
    types: dict[str, TensorTypes] | None = None,
) -> str:
    """report.md: what was built, how far it drifts, how fast it runs, and whether it fits the device."""
    lines = [f"# edgeft bundle for `{target.name}`", "", f"{target.description}", ""]
    lines += [f"- base model: `{facts.base_model}`"]
    how = "full fine-tuning (every weight)" if facts.finetune_method == "full" else "LoRA, merged"
    lines += [f"- fine-tuned with {how} on {facts.train_examples} examples" + _schedule_text(facts.schedule)]
    if facts.reference_task_accuracy is not None:
        lines += [
            f"- held-out task accuracy (exact match, {facts.eval_examples} examples): base "
            f"{_fmt(facts.base_task_accuracy, '.1%')} → fine-tuned float {facts.reference_task_accuracy:.1%}"
        ]
    lines += ["- stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in facts.seconds.items()), ""]
    lines += [
        "| artifact | size MB | MB read per token | KLD mean | KLD p99 | top-1 | PPL ratio | task acc | "
        "prompt ids match | answers match | prefill tok/s | decode tok/s | TTFT ms | peak RSS MB | "
        "decode bound on device | fits RAM | budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = facts.reference_latency
    if ref is not None:
        lines.append(
            f"| PyTorch float (reference) | {ref.bytes / 1e6:.1f} | — | 0 | 0 | 100% | 1.000 | "
            f"{_fmt(facts.reference_task_accuracy, '.1%')} | 100% | 100% | {ref.prefill_tok_s:.0f} | "
            f"{ref.decode_tok_s:.0f} | {ref.ttft_ms:.1f} | {ref.peak_rss_mb:.0f} | — | — | — |"
        )
    for a in arts:
        d, lat, fp = a.drift, a.latency, a.figures(target.context_length)
        need_mb = fp.need_bytes / 1e6
        fits = (
            f"{'yes' if fp.need_bytes <= target.ram_budget_mb * 1e6 else 'NO'} ({need_mb:.0f} MB: "
            f"{fp.weights_bytes / 1e6:.0f} weights + {fp.kv_cache_mb:.0f} {fp.kv_dtype} KV)"
        )
        lines.append(
            f"| {artifact_name(a.spec) + _variant(a.spec)} | {lat.bytes / 1e6:.1f} | "
            f"{fp.decode_bytes_per_token / 1e6:.1f} | {d.kld_mean:.5f} | {d.kld_p99:.4f} | "
            f"{d.top1:.1%} | {d.ppl_ratio:.4f} | {_fmt(d.task_accuracy, '.1%')} | {d.prompt_ids_match:.1%} | "
            f"{d.answers_match:.1%} | {lat.prefill_tok_s:.0f} | "
            f"{lat.decode_tok_s:.0f} | {lat.ttft_ms:.1f} | {lat.peak_rss_mb:.0f} | "
            f"~{fp.decode_bound_tok_s(target.bandwidth_gb_s):.0f} tok/s | {fits} | "
            f"{'FAIL: ' + '; '.join(a.all_violations) if a.all_violations else 'pass'} |"
        )
    lines += [
        "",
        f"Latency measured on the build host ({arts[0].latency.threads if arts else '?'} threads, "
        f"{arts[0].latency.prompt_tokens if arts else '?'}-token prompt, medians of "
        f"{arts[0].latency.runs if arts else '?'} runs after a warm-up). "
        '"MB read per token" = the weights decode streams for each token, from the artifact\'s tensors: all '
        "of them but the token embedding table, of which only one row is gathered (unless the output head is "
        "tied to it: then that one matrix is the head, streamed whole, and the embedding rows are gathered "
        "from it); an untied model's ONNX folder keeps a float32 embedding for the gather, so its file "
        f'is bigger than what decode reads. "decode bound on device" = the profile\'s {target.bandwidth_gb_s:g} '
        "GB/s ÷ MB read per token, the memory-bandwidth ceiling that decode of 100M+ parameter models runs "
        "at (tiny models are compute-bound far below it). "
        f'"fits RAM" = resident weights + the artifact\'s own KV cache at {target.context_length} tokens (f16 '
        "in llama.cpp, fp32 in onnxruntime-genai on CPU) within the profile's "
        f"{target.ram_budget_mb} MB budget.",
        "",
        f"App path ({facts.eval_examples} conversations: {facts.eval_source}): each artifact renders the "
        "conversation with its own chat template and tokenizer and answers greedily in its own runtime "
        "(llama-cpp-python's create_chat_completion path, onnxruntime-genai's apply_chat_template + "
        '`Generator`). "prompt ids match" = share of conversations whose prompt ids equal the fine-tune\'s; '
        '"answers match" = share whose answers equal the float model\'s, token for token.',
        "",
    ]
    lines += adapter_costs(arts)
    diffs = [
        f"- {artifact_name(a.spec)}{_variant(a.spec)}: {d}"
        for a in arts
        for d in (a.drift.prompt_diff, a.drift.answer_diff)
        if d
    ]
    if diffs:
        lines += ["First differences:", "", *diffs, ""]
    types = tensor_types_by_label(arts) if types is None else types
    written = [_types_line(a, types[a.spec.label]) for a in arts if a.spec.label in types]
    if written:
        lines += ["Tensor types actually written (share of the weight bytes; the output head's type):", ""]
        lines += [*written, ""]
    if any(len(group) > 1 for group in _slots(facts.candidates).values()):
        lines += _candidates_section(facts)
    if facts.skipped:
        lines += ["Skipped (they cannot fit the device's RAM; `edgeft build --strict` stops instead):", ""]
        lines += [f"- {s.spec.label}: {s.reason}" for s in facts.skipped] + [""]
    return "\n".join(lines)


def _schedule_text(s: dict[str, Any]) -> str:
    """', lr 1e-3 (chosen for 134.5M parameters), up to 1 epoch (chosen for its size): 64 of 64 steps, best
    validation loss at step 48 of evaluations every 16 (validation: 64 training examples held back)'."""
    if not s:
        return ""
    lr = f", lr {s['lr']:g}" + (f" (chosen for {s['lr_chosen_for']})" if s.get("lr_chosen_for") else " (set)")
    epochs = f", up to {s['epochs']:g} epoch{'s' if s['epochs'] != 1 else ''}" if s.get("epochs") else ""
    epochs += " (chosen for its size)" if s.get("epochs_auto") else ""
    steps = f": {s['steps']} of {s['max_steps']} steps"
    if s.get("validation_losses"):
        stop = (
            "stopped early: the validation loss stopped improving"
            if s.get("stopped_early")
            else "ran to the end"
        )
        steps += (
            f", {stop}; kept the best state (step {s['best_step']}, validation loss "
            f"{min(s['validation_losses']):.4f} on {s.get('validation_examples')} training examples held back)"
        )
    return lr + epochs + steps


def _slots(candidates: tuple[dict[str, Any], ...]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for c in candidates:
        out.setdefault(c["slot"], []).append(c)
    return out


def _candidates_section(facts: BuildFacts) -> list[str]:
    """The search: every candidate per slot, what it measured and why it won or lost (edgeft.search)."""
    lines = [
        "## Candidates",
        "",
        "Per slot, every candidate was judged on shared token ids against the float model; those within "
        "budget went down the app path fewest-bytes-per-token first, and the first to meet every budget "
        "ships (decode on the device is memory-bound, so fewer bytes read per token is faster there). "
        "`—` = not measured.",
    ]
    if facts.imatrix:
        im = facts.imatrix
        lines += [
            "",
            f"Importance matrix: {im.get('examples')} examples of the fine-tuning data's training split "
            f"({im.get('tokens')} tokens, dataset sha256 {str(im.get('dataset_sha256'))[:12]}…), rendered "
            "through the chat template; never the held-out split.",
        ]
    for slot, group in _slots(facts.candidates).items():
        lines += [
            "",
            f"### {slot}",
            "",
            "| candidate | size MB | MB read per token | decode bound on device | KLD mean | top-1 | task acc | "
            "answers match | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in sorted(group, key=lambda c: c["decode_bytes_per_token"]):
            d = c["drift"]
            mark = "**" if c["chosen"] else ""
            lines.append(
                f"| {mark}{c['label']}{mark} | {c['bytes'] / 1e6:.1f} | {c['decode_bytes_per_token'] / 1e6:.2f} | "
                f"{_fmt(c['est_decode_tok_s'], '.0f')} tok/s | {_fmt(d['kld_mean'], '.5f')} | "
                f"{_fmt(d['top1'], '.1%')} | {_fmt(d['task_accuracy'], '.1%')} | "
                f"{_fmt(d['answers_match'], '.1%')} | {c['verdict']} |"
            )
        notes = [f"- {c['label']}: {c['note']}" for c in group if c.get("note")]
        notes += [
            f"- {c['label']}: steered by edgeft: {c['steered']} — this model's weights lie on a grid that type's "
            "rounding distorts (docs/requantization.md)"
            for c in group
            if c.get("steered")
        ]
        if notes:
            lines += ["", "Notes:", "", *notes]
    return [*lines, ""]


def tensor_types_by_label(arts: list[ArtifactResult]) -> dict[str, TensorTypes]:
    """The tensor types each artifact really holds, by label (edgeft.formats.tensor_types)."""
    return {a.spec.label: formats.tensor_types(Path(a.path)) for a in arts if Path(a.path).exists()}


def _types_line(a: ArtifactResult, tt: TensorTypes) -> str:
    shares = ", ".join(f"{k} {v:.1%}" for k, v in tt.shares.items() if v >= 0.001)
    head = f"; head {tt.head_type} ({tt.head_share:.1%})" if tt.head_type else ""
    steered = (
        f"; steered by edgeft: {tt.steered} (weights on a grid that type distorts: docs/requantization.md)"
        if tt.steered
        else ""
    )
    return f"- {artifact_name(a.spec)}{_variant(a.spec)}: {shares}{head}{steered}"


def adapter_costs(arts: list[ArtifactResult]) -> list[str]:
    """What each base + adapter artifact gives up against the merged artifact of the same quant: decode and
    prefill speed on this host, measured alone at the same threads (llama.cpp computes B (A x) beside every
    adapted weight, on every token)."""
    out = []
    for a in arts:
        m = a.merged_latency
        if m is None:
            continue
        lat = a.latency
        cost = 1 - lat.decode_tok_s / m.decode_tok_s if m.decode_tok_s else float("nan")
        out.append(
            f"- {artifact_name(a.spec)} (base + LoRA adapter{f', task {a.task}' if a.task else ''}): decode {lat.decode_tok_s:.0f} tok/s against "
            f"{m.decode_tok_s:.0f} tok/s merged at {a.spec.quant} ({cost:+.0%} decode cost), prefill "
            f"{lat.prefill_tok_s:.0f} against {m.prefill_tok_s:.0f} tok/s; one base in RAM serves every "
            "adapter beside it."
        )
        for t in a.tasks:  # the further tasks' adapters, each judged against its own fine-tuned float model
            d = t.drift
            out.append(
                f"  - task {t.task}: KLD mean {d.kld_mean:.5f}, top-1 {d.top1:.1%}, task accuracy "
                f"{_fmt(d.task_accuracy, '.1%')} (its float {_fmt(t.reference_task_accuracy, '.1%')}, base "
                f"{_fmt(t.base_task_accuracy, '.1%')}), prompt ids match {d.prompt_ids_match:.1%}, answers "
                f"match {d.answers_match:.1%}: {'FAIL: ' + '; '.join(t.violations) if t.violations else 'pass'}"
            )
    return ["Adapters against merging:", "", *out, ""] if out else []
