#!/usr/bin/env node
// Answer prompts with the bundle's GGUF in node-llama-cpp (what Electron desktop apps embed), exactly as
// edgeft verified it.
//
//   cd examples/node && npm ci
//   node chat.mjs "turn off the kitchen lights"                              # inside a bundle
//   node chat.mjs --bundle ../../dist/raspberrypi "turn off the kitchen lights"
//
// Everything about how to run the model comes from the bundle's model.json: the chat template (rendered
// with @huggingface/jinja, the renderer node-llama-cpp's own JinjaTemplateChatWrapper uses), its variables,
// the system prompt (none unless model.json names one: LlamaChatSession's default system prompt changes the
// answers), the end-of-turn ids and the greedy settings. A base + adapter artifact (a folder: the base model's
// GGUF and one LoRA adapter GGUF per task) loads its base and applies one adapter at model.json's scale, which
// answers as the merged model does. Options: --artifact PATH, --task NAME (the adapter, by task; default: the
// first listed), --max-tokens N, --threads N, --json (one line per prompt: prompt, prompt_ids, answer). Exit 1
// with one line on failure.
import {readFileSync, existsSync, realpathSync, statSync} from "node:fs";
import {dirname, join, resolve, sep} from "node:path";
import {availableParallelism} from "node:os";
import {fileURLToPath} from "node:url";
import {parseArgs} from "node:util";
import {Worker, isMainThread, parentPort, workerData} from "node:worker_threads";
import {Template} from "@huggingface/jinja";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const PROG = "chat.mjs";

class ExampleError extends Error {}

function loadDescription(bundle) {
    const path = join(bundle, "model.json");
    let desc;
    try {
        desc = JSON.parse(readFileSync(path, "utf8"));
    } catch (e) {
        throw new ExampleError(`${path}: cannot read it (${e.name}); is ${bundle} an edgeft bundle?`);
    }
    if (desc === null || typeof desc !== "object" || desc.schema_version !== 1)
        throw new ExampleError(`${path}: not a model.json this example knows (schema_version 1)`);
    return desc;
}

function pickArtifact(bundle, desc, rel) {
    const entries = (desc.artifacts ?? []).filter((a) => a.format === "gguf");
    const paths = entries.map((a) => a.path);
    if (rel == null) {
        if (paths.length === 0) throw new ExampleError(`${bundle}: model.json lists no gguf artifact`);
        rel = paths[0];
    } else if (!paths.includes(rel)) {
        throw new ExampleError(`${rel}: not a gguf artifact of this bundle (have: ${paths.join(", ") || "none"})`);
    }
    const real = insideBundle(bundle, rel);
    if (real === null) throw new ExampleError(`${rel}: missing from the bundle`);
    return [real, entries.find((a) => a.path === rel)];
}

// `rel` (a path from model.json, relative to the bundle) with every symlink resolved, or null when it is not a
// path, does not exist or leads outside the bundle's real folder (a link to elsewhere, "..", an absolute path)
function insideBundle(bundle, rel) {
    if (typeof rel !== "string" || rel === "") return null;
    const root = realpathSync(bundle);
    const path = resolve(root, rel);
    // resolve symlinks first, then require the real file inside the bundle's real folder
    const real = existsSync(path) ? realpathSync(path) : null;
    return real !== null && real.startsWith(root + sep) ? real : null;
}

// the regular file `rel` names inside the bundle (see insideBundle), or a one-line failure naming `what`
function bundleFile(bundle, rel, what) {
    const real = insideBundle(bundle, rel);
    if (real === null) throw new ExampleError(`${String(rel).slice(0, 200)}: ${what} is not a file inside the bundle`);
    if (!statSync(real).isFile()) throw new ExampleError(`${rel}: ${what} is not a regular file`);
    return real;
}

// a base + adapter artifact's base model file and the adapter ({filePath, scale}) of `task` (default: the first
// listed), each a regular file inside the bundle
function pickAdapter(bundle, entry, task) {
    const rel = entry.path;
    const listed = entry.adapters;
    if (!Array.isArray(listed) || listed.length === 0 || !listed.every((a) => a !== null && typeof a === "object"))
        throw new ExampleError(`${rel}: model.json lists no adapters for this base + adapter artifact`);
    const tasks = listed.map((a) => String(a.task));
    if (task != null && !tasks.includes(task))
        throw new ExampleError(`--task ${task}: ${rel} has no such task (have: ${tasks.join(", ")})`);
    const i = task == null ? 0 : tasks.indexOf(task);
    // each file sits directly in the artifact's own folder (the files edgeft check loaded), then in the bundle
    for (const p of [entry.base, listed[i].path]) {
        if (typeof p !== "string" || !p.startsWith(`${rel}/`) || p.slice(rel.length + 1).includes("/"))
            throw new ExampleError(`${p}: not a file inside the bundle's ${rel} folder`);
    }
    const base = bundleFile(bundle, entry.base, `the base model of ${rel}`);
    const filePath = bundleFile(bundle, listed[i].path, `the ${tasks[i]} adapter of ${rel}`);
    const scale = listed[i].scale ?? 1;
    if (typeof scale !== "number" || !Number.isFinite(scale))
        throw new ExampleError(`${rel}: the ${tasks[i]} adapter's scale ${JSON.stringify(scale)} is not a number`);
    return [base, {filePath, scale}];
}

function conversation(desc, prompt) {
    const system = desc.prompt.system_prompt;  // null: send none (an empty string is still a system turn)
    return [...(system != null ? [{role: "system", content: system}] : []), {role: "user", content: prompt}];
}

// @huggingface/jinja gives a template what transformers does: raise_exception, strftime_now, tojson
// (non-ASCII kept), trim_blocks and lstrip_blocks; then model.json's variables and the generation prompt
// A chat template is a program from whoever made the bundle: it renders in a worker thread with a heap limit,
// a time limit and a cap on the text's length (a nested range(100000) loop would hang the app).
const RENDER_MS = 1000 * (Number(process.env.EDGEFT_RENDER_SECONDS) || 20);
const RENDER_HEAP_MB = 512;
const RENDER_CHARS = 200000;

function renderHere(desc, messages) {
    const text = new Template(desc.chat_template).render({
        messages,
        add_generation_prompt: desc.prompt.add_generation_prompt,
        ...(desc.template_variables ?? {}),
    });
    if (text.length > RENDER_CHARS) throw new Error(`the rendering grew past ${RENDER_CHARS} characters`);
    return text;
}

const printable = (s) => String(s).replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`);

// every conversation's text, rendered in one worker within the bounds above; a template past them is one line
function renderAll(desc, conversations) {
    const bounds = `${RENDER_MS / 1000} s, ${RENDER_HEAP_MB} MB, ${RENDER_CHARS} characters`;
    return new Promise((resolveAll, reject) => {
        const worker = new Worker(new URL(import.meta.url), {
            workerData: {desc, conversations},
            resourceLimits: {maxOldGenerationSizeMb: RENDER_HEAP_MB, maxYoungGenerationSizeMb: 32},
        });
        const fail = (why) => reject(new ExampleError(`model.json chat_template: ${printable(why)}`));
        const timer = setTimeout(() => {
            worker.terminate();
            fail(`did not finish rendering within ${bounds}`);
        }, RENDER_MS);
        worker.on("message", (m) => {
            clearTimeout(timer);
            if (m.error != null) fail(m.error);
            else resolveAll(m.texts);
        });
        worker.on("error", (e) => {
            clearTimeout(timer);
            fail(e?.code === "ERR_WORKER_OUT_OF_MEMORY" ? `needed more than ${bounds}` : `${e?.name}: ${e?.message}`);
        });
        worker.on("exit", () => clearTimeout(timer));
    });
}

// `adapter` ({filePath, scale}, or null for a merged model): a LoRA adapter applied on the base model `path`
async function answer(path, desc, prompts, maxNew, threads, adapter) {
    const llama = await getLlama({gpu: false, logLevel: LlamaLogLevel.error});
    const model = await llama.loadModel({modelPath: path});
    // node-llama-cpp 3 loads LoRA adapters onto a context (LlamaContextOptions.lora, in
    // dist/evaluator/LlamaContext/types.d.ts); they are freed with the model
    const lora = adapter != null ? {lora: {adapters: [adapter]}} : {};
    const context = await model.createContext({contextSize: desc.context_length, threads, ...lora});
    const sequence = context.getSequence();
    const ends = new Set(desc.tokens.end_of_turn.map((t) => t.id));
    const gen = desc.generation;
    const out = [];
    try {
        const texts = await renderAll(desc, prompts.map((p) => conversation(desc, p)));
        for (const [i, prompt] of prompts.entries()) {
            const text = texts[i];
            // parse special tokens ("<|im_start|>" is one token); add BOS only if model.json says so
            const ids = model.tokenize(text, desc.prompt.parse_special);
            if (desc.prompt.add_special_tokens && model.tokens.bos != null) ids.unshift(model.tokens.bos);
            if (ids.length + maxNew > desc.context_length) {
                throw new ExampleError(
                    `the prompt (${ids.length} tokens) and the answer (up to ${maxNew}) do not fit the context of ` +
                        `${desc.context_length} tokens (model.json context_length); shorten the prompt or pass a smaller --max-tokens`,
                );
            }
            await sequence.clearHistory();
            const answerIds = [];
            for await (const token of sequence.evaluate(ids, {temperature: gen.temperature, topK: gen.top_k})) {
                if (ends.has(token) || model.isEogToken(token)) break;
                answerIds.push(token);
                if (answerIds.length >= maxNew) break;
            }
            let answerText = model.detokenize(answerIds);
            for (const stop of desc.stop_strings ?? []) {
                const at = answerText.indexOf(stop);
                if (at >= 0) answerText = answerText.slice(0, at);
            }
            out.push([Array.from(ids), answerText]);
        }
    } finally {
        await context.dispose();
        await model.dispose();
        await llama.dispose();
    }
    return out;
}

async function main(argv) {
    const here = dirname(fileURLToPath(import.meta.url));
    const inBundle = resolve(here, "..", "..");
    const {values: a, positionals: prompts} = parseArgs({
        args: argv,
        allowPositionals: true,
        options: {
            bundle: {type: "string"},
            artifact: {type: "string"},
            task: {type: "string"},
            "max-tokens": {type: "string"},
            threads: {type: "string"},
            json: {type: "boolean", default: false},
            help: {type: "boolean", short: "h", default: false},
        },
    });
    if (a.help)
        return `usage: node ${PROG} [--bundle DIR] [--artifact PATH] [--task NAME] [--max-tokens N] [--threads N] [--json] ` +
            "PROMPT...\n";
    if (prompts.length === 0) throw new ExampleError("give at least one PROMPT");
    const bundle = a.bundle ?? (existsSync(join(inBundle, "model.json")) ? inBundle : null);
    if (bundle == null) throw new ExampleError("no bundle: pass --bundle DIR (the folder holding model.json)");
    const desc = loadDescription(bundle);
    let [path, entry] = pickArtifact(bundle, desc, a.artifact);
    let adapter = null;
    if ("base" in entry || "adapters" in entry) {  // a base + adapter folder: load its base, apply one adapter
        [path, adapter] = pickAdapter(bundle, entry, a.task);
    } else if (a.task != null) {
        throw new ExampleError(`--task ${a.task}: ${entry.path} is a merged model, it has no adapters`);
    }
    const maxNew = a["max-tokens"] != null ? Number(a["max-tokens"]) : desc.generation.max_new_tokens;
    if (!Number.isInteger(maxNew) || maxNew < 1) throw new ExampleError(`--max-tokens = ${a["max-tokens"]} should be 1 or more`);
    // decode threads: what the artifact ran fastest at on the device (after `edgeft bench`), else the profile's;
    // never more than this machine's cores (more threads than cores stall llama.cpp)
    const wanted = entry.threads?.decode ?? desc.threads ?? 1;
    const threads = a.threads != null ? Number(a.threads) : Math.max(1, Math.min(wanted, availableParallelism()));
    if (!Number.isInteger(threads) || threads < 1) throw new ExampleError(`--threads = ${a.threads} should be 1 or more`);
    const results = await answer(path, desc, prompts, maxNew, threads, adapter);
    return results
        .map(([ids, text], i) => (a.json ? JSON.stringify({prompt: prompts[i], prompt_ids: ids, answer: text}) : text) + "\n")
        .join("");
}

if (!isMainThread) {  // the template worker (renderAll): render, answer, and end
    try {
        const {desc, conversations} = workerData;
        parentPort.postMessage({texts: conversations.map((m) => renderHere(desc, m))});
    } catch (e) {
        parentPort.postMessage({error: `${e?.name ?? "Error"}: ${String(e?.message ?? e).split("\n")[0].slice(0, 300)}`});
    }
} else main(process.argv.slice(2)).then(
    (text) => process.stdout.write(text, () => process.exit(0)),  // exit once the answers are written out
    (e) => {
        const first = (String(e?.message ?? e).trim().split("\n")[0]) || e?.name || "error";
        console.error(`${PROG}: error: ${e instanceof ExampleError ? first : `${e?.name ?? "Error"}: ${first}`}`);
        process.exit(1);
    },
);
