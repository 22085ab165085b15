"""Device diagnostic: the CUDA build, a streamed run with host slots; with and without op_offload.

Environment: POLICY (a policy, or "none" for no hook; default a 2-slot host cache), NO_OP_OFFLOAD=1, N
(tokens). Reads /tmp/tiny.gguf.
"""
import faulthandler
import os

faulthandler.enable(file=os.fdopen(os.dup(2), "w"))


def main() -> None:
    import llama_cpp.llama_cpp as lc

    from flashmoe.engine import Engine
    from flashmoe.settings import StreamSettings

    if os.environ.get("NO_OP_OFFLOAD") == "1":
        orig = lc.llama_context_default_params

        def params():
            x = orig()
            x.op_offload = False
            return x

        lc.llama_context_default_params = params
    pol = os.environ.get("POLICY")
    kw = dict(policy=pol) if pol else dict(stream=StreamSettings(mode="cache", cache_slots=2, readers=2))
    if pol == "none":
        kw = {}
    with Engine("/tmp/tiny.gguf", n_ctx=512, use_extra_bufts=False, verbose=True, **kw) as e:
        g = e.generate("The quick brown fox jumps over the lazy dog. " * 4, int(os.environ.get("N", "16")),
                       stop_at_eos=False)
        print("OK", g.tokens[:8], e.mode_line(), flush=True)


if __name__ == "__main__":
    main()
