"""`gpu` placement on a CPU build: the plan is "nothing offloaded" and the report says the placement is
ignored; the tensor-override array that a GPU build passes to llama.cpp is well formed and llama.cpp
accepts it (the real load, overriding tensors to the CPU buffer type). The GPU runs themselves are in
docs/runs/ (scripts/device_run.sh on the lent H200)."""
from __future__ import annotations



from flashmoe import gpu
from flashmoe import llama as llama_api
from flashmoe.engine import Engine
from gguf_tools.reader import open_model


def test_cpu_build_offloads_nothing(llama_cpp):
    assert gpu.offload_supported() is False
    assert gpu.plan({"a": "gpu", "b": "pin"}) == (0, [])


def test_plan_on_a_gpu_build_keeps_the_rest_on_the_host(monkeypatch):
    monkeypatch.setattr(gpu, "offload_supported", lambda: True)
    n, host = gpu.plan({"blk.0.attn_q.weight": "gpu", "token_embd.weight": "ram",
                        "blk.0.ffn_up_exps.weight": "stream", "output.weight": "pin"})
    assert n == -1 and host == ["token_embd.weight", "output.weight"]
    assert gpu.plan({"x": "pin"}) == (0, [])  # nothing placed gpu: nothing offloaded


def test_override_array_is_null_terminated_and_exact(llama_cpp):
    arr, keep = gpu.host_overrides(["blk.0.attn_q.weight", "output.weight"])
    assert [arr[i].pattern for i in range(2)] == [b"^blk\\.0\\.attn_q\\.weight$", b"^output\\.weight$"]
    assert arr[0].buft and arr[0].buft == arr[1].buft
    assert arr[2].pattern is None and not arr[2].buft
    assert gpu.host_overrides([]) == (None, [])


def test_llama_cpp_accepts_the_overrides(tiny_model, llama_cpp):
    """A real load with every tensor overridden to the CPU buffer type: same tokens as without."""
    with open_model(tiny_model) as m:
        names = [t.name for t in m.tensors]
    arr, _ = gpu.host_overrides(names)
    a = llama_api.load(tiny_model, use_extra_bufts=False, tensor_overrides=arr, n_ctx=128, verbose=False)
    b = llama_cpp.Llama(tiny_model, n_ctx=128, verbose=False, use_mmap=True)
    try:
        t = a.tokenize(b"hello world")
        ga = [x for _, x in zip(range(8), a.generate(t, top_k=1, temp=0.0))]
        gb = [x for _, x in zip(range(8), b.generate(t, top_k=1, temp=0.0))]
        assert ga == gb
    finally:
        a.close()
        b.close()


def test_gpu_policy_on_a_cpu_build_says_so(tiny_model, llama_cpp):
    with Engine(tiny_model, policy="gpu-dense", n_ctx=256) as e:
        assert e.n_gpu_layers == 0
        assert "layers offloaded" not in e.mode_line()
        assert e.settings.stream.mode == "cache"  # the experts still stream, into a host cache


def test_the_gpu_memory_is_asked_in_a_child_process_and_only_when_a_plan_needs_it(monkeypatch):
    """Asking the backend for the GPU's memory creates its context (about 0.5 GiB of an H200's memory): a
    planning process asks a short-lived child, once, and only for a plan that puts something in device memory.
    On a CPU build the answer is None."""
    from flashmoe import gpu
    from flashmoe.policy import MachineInfo

    gpu._ASKED.clear()
    calls = []
    real = gpu._device_memory_in_child
    monkeypatch.setattr(gpu, "_device_memory_in_child", lambda: calls.append(1) or real())
    m = MachineInfo.detect()
    assert m.gpu_memory is None and m.detect_gpu_memory
    if m.gpu() is None:  # this CPU build: nothing to ask
        assert m.gpu_memory_bytes() is None and calls == []
    assert gpu.device_memory() == gpu.device_memory()  # asked once per process
    assert len(calls) == 1
    assert (real() is None) == (not gpu.offload_supported())
