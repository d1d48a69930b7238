"""llmfold: an ONNX graph compiler that makes Llama-family LLMs small and fast on CPUs and phones.

Python API (mirrors the CLI):

    from compiler import export, compile_model, evaluate, generate
    export("smollm2-135m", "out/fp32")
    compile_model("out/fp32", "out/w4a8", recipe="w4a8")
    evaluate("out/w4a8", text="held_out.txt")
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["export", "compile_model", "evaluate", "generate", "inspect_path", "__version__"]


def __getattr__(name: str):
    # Lazy: importing the package must stay cheap (the CLI imports torch only when it needs it).
    if name == "export":
        from compiler.export import export

        return export
    if name == "compile_model":
        from compiler.driver import compile_model

        return compile_model
    if name in ("evaluate", "generate"):
        from compiler import runtime

        return getattr(runtime, name)
    if name == "inspect_path":
        from compiler.inspect import inspect_path

        return inspect_path
    raise AttributeError(name)
