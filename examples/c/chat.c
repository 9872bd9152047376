/* Answer prompts with the bundle's GGUF through llama.cpp's C API (llama.h), with no template engine and no
 * JSON parser: the prompt is built by concatenation from the recipe edgeft derived from the chat template and
 * proved equal to its rendering, as model.kv (model.json's flat twin, at the bundle's root) carries it.
 *
 *   # llama.h and libllama from any llama.cpp build; here the ones llama-cpp-python installs:
 *   LLAMA=$(python3 -c 'import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent)')
 *   cc -O2 -std=c11 chat.c -I"$LLAMA/../include" -L"$LLAMA/lib" -lllama -Wl,-rpath,"$LLAMA/lib" -o /tmp/chat
 *   /tmp/chat --bundle path/to/bundle "turn off the kitchen lights"
 *
 * (Build it outside the bundle: a file added to a bundle fails `edgeft check`.) model.kv decides everything a
 * template engine would: the text around each message (recipe.*), where a system prompt goes, whether special
 * tokens are parsed in the text (prompt.parse_special) and added (prompt.add_special_tokens), the ids an
 * answer ends at (end_of_turn) and the longest answer. Decoding is greedy, as edgeft verified. A base +
 * adapter artifact loads its base and one LoRA adapter (--task picks it; default: the first listed) at
 * model.kv's scale. model.kv comes with the bundle, so it is read as a stranger's file: every path must stay
 * inside the bundle, every number within range, and a fault is one line and exit status 1.
 * One answer per prompt (--json: {"prompt", "prompt_ids", "answer"}).
 */
#define _DEFAULT_SOURCE
#include <ctype.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "llama.h"

#define MAX_KV_BYTES (1 << 20) /* model.kv is a few KB: a dozen strings and numbers */
#define MAX_KV_LINES 4096
#define MAX_END_IDS 64

static const char *prog = "chat";

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: error: ", prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n ? n : 1);
    if (!p) die("out of memory");
    return p;
}

static char *xstrdup(const char *s) { return strcpy(xrealloc(NULL, strlen(s) + 1), s); }

/* a value from model.kv or the command line, fit for one line of a message: control bytes escaped, cut at
 * 120 bytes (four rotating buffers, so one message may show several) */
static const char *shown(const char *s) {
    static char bufs[4][512];
    static int next;
    char *out = bufs[next++ % 4], *o = out;
    for (size_t i = 0; s[i] && o < out + 120 * 4; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f) o += sprintf(o, "\\x%02x", c);
        else *o++ = (char)c;
    }
    *o = '\0';
    return out;
}

/* ---- model.kv: `key=value` lines, values escaped as \\ \n \r \t \xHH (edgeft.runspec.flat) ---- */

typedef struct {
    char *key[MAX_KV_LINES];
    char *val[MAX_KV_LINES];
    int n;
} kv_t;

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    c = tolower(c);
    return (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
}

static char *unescape(const char *s, const char *file, int line) {
    char *out = xrealloc(NULL, strlen(s) + 1), *o = out;
    for (; *s; s++) {
        if (*s != '\\') { *o++ = *s; continue; }
        s++;
        if (*s == '\\') *o++ = '\\';
        else if (*s == 'n') *o++ = '\n';
        else if (*s == 'r') *o++ = '\r';
        else if (*s == 't') *o++ = '\t';
        else if (*s == 'x' && hexval(s[1]) >= 0 && hexval(s[2]) >= 0 && (hexval(s[1]) || hexval(s[2]))) {
            *o++ = (char)(hexval(s[1]) * 16 + hexval(s[2]));  /* s[2] is read only when s[1] was a digit */
            s += 2;
        } else die("%s:%d: a bad escape in a value (or a NUL byte); rebuild the bundle with edgeft", file, line);
    }
    *o = '\0';
    return out;
}

/* model.kv, read as a stranger's file: a regular file (no link, FIFO or device), at most MAX_KV_BYTES */
static void kv_read(kv_t *kv, const char *path) {
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
    struct stat st;
    if (fd < 0) die("%s: cannot open it (or it is a link); pass --bundle DIR, the folder holding model.kv", path);
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) die("%s: not a regular file", path);
    if (st.st_size > MAX_KV_BYTES) die("%s: %lld bytes, more than a model.kv holds", path, (long long)st.st_size);
    char *text = xrealloc(NULL, (size_t)st.st_size + 1);
    size_t got = 0;
    for (ssize_t r; got < (size_t)st.st_size && (r = read(fd, text + got, (size_t)st.st_size - got)) > 0;) got += (size_t)r;
    close(fd);
    text[got] = '\0';
    if (strlen(text) != got) die("%s: holds a NUL byte; rebuild the bundle with edgeft", path);
    int line = 0;
    kv->n = 0;
    for (char *p = text, *next; p < text + got; p = next) {
        char *nl = memchr(p, '\n', (size_t)(text + got - p));
        next = nl ? nl + 1 : text + got;
        if (nl) *nl = '\0';
        line++;
        if (*p == '#' || *p == '\0') continue;
        char *eq = strchr(p, '=');
        if (!eq) die("%s:%d: not a key=value line", path, line);
        if (kv->n == MAX_KV_LINES) die("%s: more than %d lines", path, MAX_KV_LINES);
        *eq = '\0';
        kv->key[kv->n] = xstrdup(p);
        kv->val[kv->n] = unescape(eq + 1, path, line);
        kv->n++;
    }
    free(text);
}

/* the value of `key` in lines [from, to), or NULL */
static const char *kv_in(const kv_t *kv, const char *key, int from, int to) {
    for (int i = from; i < to; i++)
        if (strcmp(kv->key[i], key) == 0) return kv->val[i];
    return NULL;
}

static const char *kv_get(const kv_t *kv, const char *key) {
    const char *v = kv_in(kv, key, 0, kv->n);
    if (!v) die("model.kv: no `%s`; rebuild the bundle with a current edgeft", key);
    return v;
}

/* a whole decimal number in [lo, hi], else one line naming `what` */
static long number(const char *v, long lo, long hi, const char *what) {
    char *end;
    long n = strtol(v, &end, 10);
    if (*v == '\0' || *end != '\0' || n < lo || n > hi) die("%s is not a number from %ld to %ld (%s)", what, lo, hi, shown(v));
    return n;
}

static long kv_int(const kv_t *kv, const char *key, long lo, long hi) {
    char what[64];
    snprintf(what, sizeof what, "model.kv: `%s`", key);
    return number(kv_get(kv, key), lo, hi, what);
}

/* ---- paths from the bundle stay inside it ---- */

/* `rel` (a path from model.kv, relative to the bundle) with every symlink resolved: a regular file (a folder
 * when `folder`) inside the real folder `within` (the bundle, or a base + adapter artifact's own folder),
 * else one line naming it */
static char *inside(const char *bundle_real, const char *within, const char *rel, const char *what, bool folder) {
    size_t n = strlen(bundle_real) + strlen(rel) + 2, w = strlen(within);
    char *joined = xrealloc(NULL, n), *real = NULL;
    snprintf(joined, n, "%s/%s", bundle_real, rel);
    if (rel[0] != '/') real = realpath(joined, NULL);
    free(joined);
    if (!real || strncmp(real, within, w) != 0 || real[w] != '/')
        die("%s: %s is not a file inside the bundle%s", shown(rel), what, within == bundle_real ? "" : "'s artifact folder");
    struct stat st;
    if (stat(real, &st) != 0 || (folder ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)))
        die("%s: %s is not a %s", shown(rel), what, folder ? "folder" : "regular file");
    return real;
}

/* ---- the prompt by concatenation (edgeft.recipe.build, for an optional system prompt and one user message) */

typedef struct {
    char *s;
    size_t n, cap;
} str_t;

static void put(str_t *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->s = xrealloc(b->s, b->cap);
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = '\0';
}

static void puts_(str_t *b, const char *s) { put(b, s, strlen(s)); }

/* Python's str.isspace, which Jinja's `trim` strips (ref: jinja2 filters.py do_trim = str.strip) */
static bool py_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

#define NOT_UTF8 0xfffdu /* what a byte that starts no whole UTF-8 character reads as */

/* the UTF-8 character at s[0..n) as a code point and its length (NOT_UTF8 and 1 for a stray byte) */
static uint32_t utf8_at(const unsigned char *s, size_t n, size_t *len) {
    int k = s[0] >= 0xf8 ? 0 : s[0] >= 0xf0 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc0 ? 2 : s[0] >= 0x80 ? 0 : 1;
    *len = 1;
    if (k == 1) return s[0];
    if (k == 0 || (size_t)k > n) return NOT_UTF8;
    uint32_t c = s[0] & (0x7f >> k);
    for (int i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80) return NOT_UTF8;
        c = c << 6 | (s[i] & 0x3f);
    }
    *len = (size_t)k;
    return c;
}

/* content with leading and trailing whitespace removed when the recipe trims, as Python's str.strip does */
static void put_content(str_t *b, const char *text, bool trim) {
    const unsigned char *s = (const unsigned char *)text;
    size_t n = strlen(text), len;
    while (trim && n && py_space(utf8_at(s, n, &len))) s += len, n -= len;
    while (trim && n) {
        size_t back = 1;  /* where the last character starts */
        while (back < n && back < 4 && (s[n - back] & 0xc0) == 0x80) back++;
        uint32_t c = utf8_at(s + n - back, back, &len);
        if (len != back) back = 1, c = NOT_UTF8;  /* not one whole character: a stray byte, kept */
        if (!py_space(c)) break;
        n -= back;
    }
    put(b, (const char *)s, n);
}

static char *build_prompt(const kv_t *kv, const char *system, const char *user) {
    str_t b = {0}, pending = {0};
    bool trim = kv_int(kv, "recipe.trim", 0, 1) != 0;
    const char *mode = kv_get(kv, "recipe.system.mode");
    puts_(&pending, "");
    if (strcmp(mode, "sent") != 0 && strcmp(mode, "merged") != 0 && strcmp(mode, "unsupported") != 0)
        die("model.kv: recipe.system.mode is not sent, merged or unsupported (%s)", shown(mode));
    if (system && strcmp(mode, "sent") == 0) {
        puts_(&b, kv_get(kv, "recipe.system.prefix"));  /* its whole turn, the start included */
        put_content(&b, system, trim);
        puts_(&b, kv_get(kv, "recipe.system.suffix"));
    } else {
        puts_(&b, kv_get(kv, "recipe.start"));
        if (system && strcmp(mode, "merged") == 0) {  /* folded into the first user message */
            puts_(&pending, kv_get(kv, "recipe.system.prefix"));
            put_content(&pending, system, trim);
            puts_(&pending, kv_get(kv, "recipe.system.suffix"));
        }  /* unsupported: left out, as the template leaves it out */
    }
    puts_(&b, kv_get(kv, "recipe.user.prefix"));
    puts_(&b, pending.s);
    put_content(&b, user, trim);
    puts_(&b, kv_get(kv, "recipe.user.suffix"));
    puts_(&b, kv_get(kv, "recipe.generation_prompt"));
    free(pending.s);
    return b.s;
}

static void quiet(enum ggml_log_level level, const char *text, void *user_data) {
    (void)level, (void)text, (void)user_data;  /* llama.cpp's log lines are not the answer */
}

/* ---- output ---- */

/* a JSON string; bytes that are not UTF-8 (an answer cut inside a character) become U+FFFD */
static void json_string(const char *text, size_t n) {
    const unsigned char *s = (const unsigned char *)text;
    putchar('"');
    for (size_t i = 0, len; i < n; i += len) {
        uint32_t c = utf8_at(s + i, n - i, &len);
        if (c == NOT_UTF8 && len == 1) fputs("\\ufffd", stdout);
        else if (c == '"' || c == '\\') printf("\\%c", (int)c);
        else if (c == '\n') fputs("\\n", stdout);
        else if (c < 0x20 || c == 0x7f) printf("\\u%04x", (unsigned)c);
        else fwrite(s + i, 1, len, stdout);
    }
    putchar('"');
}

static void usage(void) {
    die("usage: %s [--bundle DIR] [--artifact PATH] [--task NAME] [--max-tokens N] [--threads N] [--json] PROMPT...",
        prog);
}

int main(int argc, char **argv) {
    const char *bundle = ".", *want_artifact = NULL, *want_task = NULL;
    long max_tokens = -1, threads = -1;
    bool as_json = false;
    int first_prompt = argc;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has = i + 1 < argc;
        if (strcmp(a, "--bundle") == 0 && has) bundle = argv[++i];
        else if (strcmp(a, "--artifact") == 0 && has) want_artifact = argv[++i];
        else if (strcmp(a, "--task") == 0 && has) want_task = argv[++i];
        else if (strcmp(a, "--max-tokens") == 0 && has) max_tokens = number(argv[++i], 1, 1000000, "--max-tokens");
        else if (strcmp(a, "--threads") == 0 && has) threads = number(argv[++i], 1, 4096, "--threads");
        else if (strcmp(a, "--json") == 0) as_json = true;
        else if (a[0] == '-' && a[1] == '-') usage();
        else { first_prompt = i; break; }
    }
    if (first_prompt == argc) usage();

    char *bundle_real = realpath(bundle, NULL);
    if (!bundle_real) die("%s: no such folder; pass --bundle DIR, the folder holding model.kv", shown(bundle));
    size_t n = strlen(bundle_real) + sizeof "/model.kv";
    char *kv_path = xrealloc(NULL, n);
    snprintf(kv_path, n, "%s/model.kv", bundle_real);
    static kv_t kv;
    kv_read(&kv, kv_path);
    if (kv_int(&kv, "schema_version", 0, INT_MAX) != 1) die("%s: not a model.kv this example knows (schema_version 1)", kv_path);
    if (kv_int(&kv, "recipe", 0, 1) == 0)
        die("%s: this model's chat template has no recipe (%s); use an example with a template engine",
            kv_path, shown(kv_get(&kv, "recipe_reason")));

    /* the artifact: --artifact, else the first GGUF; its own keys run to the next `artifact=` line */
    int at = -1, end = kv.n;
    for (int i = 0; i < kv.n && at < 0; i++) {
        if (strcmp(kv.key[i], "artifact") != 0) continue;
        int j = i + 1;
        while (j < kv.n && strncmp(kv.key[j], "artifact.", 9) == 0) j++;
        const char *fmt = kv_in(&kv, "artifact.format", i + 1, j);
        if (want_artifact ? strcmp(kv.val[i], want_artifact) == 0 : (fmt && strcmp(fmt, "gguf") == 0)) at = i, end = j;
    }
    if (at < 0) die("%s: model.kv lists no %s", shown(bundle), want_artifact ? shown(want_artifact) : "gguf artifact");
    const char *name = shown(kv.val[at]), *fmt = kv_in(&kv, "artifact.format", at + 1, end);
    if (!fmt || strcmp(fmt, "gguf") != 0) die("%s: not a GGUF artifact; this example runs llama.cpp", name);
    const char *base = kv_in(&kv, "artifact.base", at + 1, end);
    char *model_path, *adapter_path = NULL;
    float scale = 1.0f;
    if (base) {  /* `artifact.adapter=TASK SCALE PATH` lines: the one for --task, else the first */
        char *folder = inside(bundle_real, bundle_real, kv.val[at], "the artifact", true), tasks[1024] = "";
        model_path = inside(bundle_real, folder, base, "the base model", false);
        for (int i = at + 1; i < end && !adapter_path; i++) {
            if (strcmp(kv.key[i], "artifact.adapter") != 0) continue;
            char task[256], *rest;
            const char *v = kv.val[i], *sp = strchr(v, ' ');
            if (!sp || (size_t)(sp - v) >= sizeof task) die("%s: a bad artifact.adapter line (%s)", kv_path, shown(v));
            memcpy(task, v, (size_t)(sp - v));
            task[sp - v] = '\0';
            if (want_task && strcmp(task, want_task) != 0) {
                if (strlen(tasks) + strlen(task) + 3 < sizeof tasks) strcat(strcat(tasks, *tasks ? ", " : ""), task);
                continue;
            }
            scale = strtof(sp + 1, &rest);
            if (rest == sp + 1 || *rest != ' ' || !isfinite(scale))
                die("%s: the %s adapter's scale is not a number (%s)", name, shown(task), shown(v));
            adapter_path = inside(bundle_real, folder, rest + 1, "an adapter", false);
        }
        if (!adapter_path && want_task) die("--task %s: %s has no such task (have: %s)", shown(want_task), name, shown(tasks));
        if (!adapter_path) die("%s: model.kv lists no adapters for this base + adapter artifact", name);
        free(folder);
    } else {
        if (want_task) die("--task %s: %s is a merged model, it has no adapters", shown(want_task), name);
        model_path = inside(bundle_real, bundle_real, kv.val[at], "the artifact", false);
    }
    if (max_tokens < 0) max_tokens = kv_int(&kv, "max_new_tokens", 1, 1000000);
    /* threads: --threads, else the artifact's measured "DECODE PREFILL", else the profile's; never more than
     * this machine's cores (more only slows a busy machine down) */
    long decode_threads = threads, prefill_threads = threads, cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (threads < 0) {
        const char *measured = kv_in(&kv, "artifact.threads", at + 1, end);
        if (measured) {
            char d[32], p[32];
            if (sscanf(measured, "%31s %31s", d, p) != 2) die("model.kv: a bad artifact.threads (%s)", shown(measured));
            decode_threads = number(d, 1, 4096, "model.kv: artifact.threads");
            prefill_threads = number(p, 1, 4096, "model.kv: artifact.threads");
        } else {
            decode_threads = prefill_threads = kv_int(&kv, "threads", 1, 4096);
        }
    }
    if (cores < 1) cores = 1;
    decode_threads = decode_threads > cores ? cores : decode_threads;
    prefill_threads = prefill_threads > cores ? cores : prefill_threads;
    bool add_special = kv_int(&kv, "prompt.add_special_tokens", 0, 1) != 0;
    bool parse_special = kv_int(&kv, "prompt.parse_special", 0, 1) != 0;
    const char *system = kv_in(&kv, "prompt.system_prompt", 0, kv.n);

    llama_backend_init();
    llama_log_set(quiet, NULL);
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) die("%s: llama.cpp could not load it", shown(model_path));
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    llama_token ends[MAX_END_IDS];
    int n_ends = 0;
    for (int i = 0; i < kv.n; i++) {
        if (strcmp(kv.key[i], "end_of_turn") != 0) continue;
        if (n_ends == MAX_END_IDS) die("model.kv: more than %d end_of_turn ids", MAX_END_IDS);
        ends[n_ends++] = (llama_token)number(kv.val[i], 0, n_vocab - 1, "model.kv: an end_of_turn id");
    }
    if (n_ends == 0) die("model.kv: no end_of_turn id; an answer would never end");
    struct llama_context_params cp = llama_context_default_params();
    /* the context: model.kv's, within what the model was trained for (a larger one only costs memory) */
    cp.n_ctx = (uint32_t)kv_int(&kv, "context_length", 1, llama_model_n_ctx_train(model));
    cp.n_batch = cp.n_ctx;
    cp.n_threads = (int32_t)decode_threads;
    cp.n_threads_batch = (int32_t)prefill_threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) die("%s: llama.cpp could not make a context of %u tokens", shown(model_path), cp.n_ctx);
    if (adapter_path) {  /* ref: llama.h llama_adapter_lora_init, llama_set_adapters_lora */
        struct llama_adapter_lora *lora = llama_adapter_lora_init(model, adapter_path);
        if (!lora) die("%s: llama.cpp could not load the adapter for this base", shown(adapter_path));
        if (llama_set_adapters_lora(ctx, &lora, 1, &scale) != 0) die("%s: llama.cpp could not apply it", shown(adapter_path));
    }

    for (int p = first_prompt; p < argc; p++) {
        char *text = build_prompt(&kv, system, argv[p]);
        if (strlen(text) > INT_MAX / 8) die("the prompt is too long");
        int len = (int)strlen(text), cap = len + 16;
        llama_token *ids = xrealloc(NULL, sizeof(llama_token) * (size_t)cap);
        int n_ids = llama_tokenize(vocab, text, len, ids, cap, add_special, parse_special);
        if (n_ids < 0 && n_ids != INT32_MIN) {  /* more ids than bytes: the count it needs */
            cap = -n_ids;
            ids = xrealloc(ids, sizeof(llama_token) * (size_t)cap);
            n_ids = llama_tokenize(vocab, text, len, ids, cap, add_special, parse_special);
        }
        if (n_ids <= 0) die("llama.cpp could not tokenize the prompt");
        if ((long long)n_ids + max_tokens > (long long)cp.n_ctx + 1)
            die("the prompt (%d tokens) and answer (%ld) do not fit the context of %u tokens", n_ids, max_tokens, cp.n_ctx);
        llama_memory_clear(llama_get_memory(ctx), true);  /* each prompt a fresh conversation */
        str_t answer = {0};
        puts_(&answer, "");
        struct llama_batch batch = llama_batch_get_one(ids, n_ids);
        llama_token tok;
        for (long k = 0; k < max_tokens; k++) {
            if (llama_decode(ctx, batch) != 0) die("llama.cpp failed to decode");
            const float *logits = llama_get_logits_ith(ctx, -1);
            tok = 0;  /* greedy: the most likely id, the first of equals */
            for (int v = 1; v < n_vocab; v++)
                if (logits[v] > logits[tok]) tok = v;
            bool stop = false;
            for (int e = 0; e < n_ends; e++) stop = stop || tok == ends[e];
            if (stop) break;
            char piece[256];
            int m = llama_token_to_piece(vocab, tok, piece, sizeof piece, 0, false);
            if (m < 0) die("token %d has a piece longer than %zu bytes", tok, sizeof piece);
            put(&answer, piece, (size_t)m);
            batch = llama_batch_get_one(&tok, 1);
        }
        if (as_json) {
            fputs("{\"prompt\": ", stdout);
            json_string(argv[p], strlen(argv[p]));
            fputs(", \"prompt_ids\": [", stdout);
            for (int i = 0; i < n_ids; i++) printf(i ? ", %d" : "%d", ids[i]);
            fputs("], \"answer\": ", stdout);
            json_string(answer.s, answer.n);
            fputs("}\n", stdout);
        } else {
            printf("%s\n", answer.s);
        }
        fflush(stdout);
        free(answer.s);
        free(ids);
        free(text);
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
