// Print llama.cpp's logits for every position of a token sequence, to compare with ours.
// usage: dump_logits MODEL.gguf --ids 1 2 3 ...     (logits for given ids)
//        dump_logits MODEL.gguf --text "some text"  (llama.cpp's own tokenization, then logits)
// Output: line 1 the token ids; then one line of n_vocab logits per position.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf (--ids ID... | --text TEXT)\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    llama_model_params mparams = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) { fprintf(stderr, "failed to load %s\n", argv[1]); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    std::vector<llama_token> ids;
    if (strcmp(argv[2], "--ids") == 0) {
        for (int i = 3; i < argc; i++) ids.push_back((llama_token) atoi(argv[i]));
    } else {
        std::string text = argv[3];
        ids.resize(text.size() + 8);
        int n = llama_tokenize(vocab, text.c_str(), (int) text.size(), ids.data(), (int) ids.size(), false, false);
        if (n < 0) { fprintf(stderr, "tokenize failed\n"); return 1; }
        ids.resize(n);
    }

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = ids.size() + 8;
    cparams.n_batch = ids.size();
    cparams.n_ubatch = ids.size();
    cparams.n_threads = 2;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) { fprintf(stderr, "failed to create context\n"); return 1; }

    llama_batch batch = llama_batch_init((int) ids.size(), 0, 1);
    for (size_t i = 0; i < ids.size(); i++) {
        batch.token[i] = ids[i];
        batch.pos[i] = (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = (int) ids.size();
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }

    const int n_vocab = llama_vocab_n_tokens(vocab);
    for (size_t i = 0; i < ids.size(); i++) printf("%d%c", ids[i], i + 1 == ids.size() ? '\n' : ' ');
    for (size_t i = 0; i < ids.size(); i++) {
        const float * logits = llama_get_logits_ith(ctx, (int) i);
        for (int v = 0; v < n_vocab; v++) printf("%.7g%c", logits[v], v + 1 == n_vocab ? '\n' : ' ');
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
