// Checks an `accllm export --format gguf` file with llama.cpp itself (docs/export.md, "Checked with
// llama.cpp"): loads the GGUF, prints llama.cpp's tokens of TEXT, decodes the token ids one at a time
// and writes each step's logits (float32, n_vocab per step) to OUT.bin.
//   build llama.cpp (libllama), then
//   gcc -O1 llama_cpp_probe.c -I$LLAMA/include -I$LLAMA/ggml/include -L$BUILD/bin -lllama -Wl,-rpath,$BUILD/bin -o probe
//   ./probe MODEL.gguf OUT.bin TEXT ID...
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    if (argc < 5) return 2;
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "load failed\n"); return 1; }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    llama_token toks[512];
    int nt = llama_tokenize(vocab, argv[3], (int)strlen(argv[3]), toks, 512, false, false);
    printf("tokens");
    for (int i = 0; i < nt; i++) printf(" %d", toks[i]);
    printf("\n");
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 64; cp.n_batch = 64; cp.n_threads = 1; cp.n_threads_batch = 1;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "context failed\n"); return 1; }
    FILE *f = fopen(argv[2], "wb");
    for (int i = 4; i < argc; i++) {
        llama_token t = atoi(argv[i]);
        if (llama_decode(ctx, llama_batch_get_one(&t, 1))) { fprintf(stderr, "decode failed\n"); return 1; }
        fwrite(llama_get_logits_ith(ctx, -1), sizeof(float), n_vocab, f);
    }
    fclose(f);
    printf("n_vocab %d steps %d\n", n_vocab, argc - 4);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
