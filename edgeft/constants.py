"""Names shared by every stage: budget kinds, the files of a bundle and of a model folder.

What belongs to one format (its quant names, keys, architectures) lives in that format's package
(edgeft/formats/<name>/constants.py).
"""

from __future__ import annotations

# --- drift budgets ---------------------------------------------------------------------------------------
# Direction of "worse" per budgeted metric: "max" budgets cap the value, "min" budgets floor it.
BUDGET_KINDS = {
    "kld_mean": "max",
    "kld_p99": "max",
    "top1": "min",
    "ppl_ratio": "max",
    "task_accuracy_drop": "max",
    "prompt_ids_match": "min",
    "answers_match": "min",
    "min_task_accuracy": "min",  # the artifact's own held-out task accuracy
    "max_size_mb": "max",  # the artifact's size on disk
}

# --- files -----------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
MODEL_JSON = "model.json"  # how an app runs the model (edgeft.runspec)
MODEL_KV = "model.kv"  # the same for programs without a JSON parser (edgeft.runspec.flat)
# Where a user installs an example's dependencies inside a bundle (`npm ci` in examples/node): edgeft never
# hashes, checks, copies to a device or removes what is there.
BUNDLE_USER_DIRS = ("examples/node/node_modules",)
CHAT_TEMPLATE_FILE = (
    "chat_template.jinja"  # transformers 5 saves the template here (ref: tokenization_utils_base)
)
REPORT = "report.md"
REPORT_HTML = "report.html"  # the same build as one self-contained page (edgeft.report_html)
CONFIG_FILE = "edgeft.toml"
# Files that make up a tokenizer and its chat template; carried unchanged into every model edgeft writes.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
# What finetune records next to an adapter (settings, data digests, the held-out split); merge carries it.
FINETUNE_RECORD = "edgeft_finetune.json"
# Weight files that are pickles (can run code when loaded): never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# --- bundle integrity ---
# Checksum list a device verifies with `sha256sum -c SHA256SUMS` (GNU coreutils: "<hex>  <path>" lines).
SHA256SUMS = "SHA256SUMS"
