"""`llmfold inspect PATH [--json] [--diff OTHER] [--svg OUT.svg]`: what is in a model.

PATH is an llmfold model directory, any directory holding a model.onnx (e.g. an
onnxruntime-genai output folder), or an .onnx file. The model is loaded with onnx_ir, whose
external tensors are read lazily: nothing here touches weight bytes, so inspecting a large
model costs the time to parse its graph.

Reported: IR version, producer, opsets and domains; graph inputs/outputs with dims; an op
histogram; initializer parameters (elements) and bytes by dtype; custom-domain ops with whether
their library loads into ONNX Runtime; and one row per linear layer (from llmfold.json's
"structure" when it still matches the graph, else from `compiler.analyze.analyze`):

    kind      dense (MatMul with a weight [K, N]), low-rank (two MatMuls [K, r]·[r, N]), int4 (QMatMul)
    bits      weight bits: the float width for dense/low-rank, the quantized width for int4 and for
              a low-rank pair whose factors the INT4 pass quantized
    group     int4 block size along K
    rank      r for low-rank
    bytes     bytes of the layer's initializers (weights, scales, zero points, bias); an initializer
              shared by several layers (fused q/k/v) is split between them in proportion to N
              (a low-rank first factor shared by pairs, passes/pack_lowrank.py: to the rank; their
              block-diagonal second factor: to rank·N);
              an lm_head that reads the embedding initializer itself reports its bytes with "tied": true
              (and is left out of the linear-bytes total)
    macs      multiply-accumulates per token: K·N for dense and int4, r·(K + N) for low-rank

`--diff OTHER` compares the per-layer rows (and totals) of PATH → OTHER; `--svg` draws bytes
per block, stacked by role, with matplotlib (Agg backend).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from compiler.errors import UserError
from compiler.structure import LINEAR_ROLES

# Domains ONNX Runtime implements itself (no library to load).
BUILTIN_DOMAINS = {
    "",
    "ai.onnx",
    "ai.onnx.ml",
    "ai.onnx.preview.training",
    "ai.onnx.training",
    "com.microsoft",
    "com.microsoft.nchwc",
    "com.microsoft.experimental",
    "com.ms.internal.nhwc",
}
_ROLE_ORDER = list(LINEAR_ROLES) + ["lm_head"]


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def _resolve(path) -> tuple[Path, dict | None]:
    """(onnx file, llmfold.json dict or None) for a directory or a file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist; pass a model directory or an .onnx file")
    if p.is_dir():
        if (p / "llmfold.json").is_file():
            from compiler.modeldir import open_model_dir

            d = open_model_dir(p)
            return Path(d.onnx_path), dict(d.meta or {})
        if (p / "model.onnx").is_file():
            return p / "model.onnx", None
        found = sorted(p.glob("*.onnx"))
        if len(found) == 1:
            return found[0], None
        raise UserError(
            f"{p} holds {'no' if not found else len(found)} .onnx files and no llmfold.json; pass the .onnx file itself"
        )
    meta = None
    side = p.parent / "llmfold.json"
    if side.is_file() and p.name == "model.onnx":
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError:
            meta = None
    return p, meta


def _load(onnx_path: Path):
    import onnx_ir as ir

    try:
        return ir.load(onnx_path)
    except Exception as e:
        raise UserError(f"cannot read {onnx_path} as an ONNX model ({type(e).__name__}: {' '.join(str(e).split())[:200]}); pass a valid .onnx file") from e


def _dims(value) -> list | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (str(d) if d is not None and str(d) else "?") for d in value.shape]


def _dtype_name(dt) -> str:
    """numpy-style names: float32, int64, float16, bfloat16, int4, uint8, ..."""
    if dt is None:
        return "?"
    if dt.name == "STRING":
        return "string"
    try:
        return dt.numpy().name
    except Exception:
        return dt.name.lower()


def _tensor_bytes(value) -> int:
    t = value.const_value
    if t is None:
        return 0
    try:
        return int(t.nbytes)
    except Exception:  # a tensor type that cannot tell: compute from shape and dtype
        import math

        return int(math.ceil(math.prod(t.shape.numpy()) * t.dtype.itemsize))


def _tensor_numel(value) -> int:
    import math

    t = value.const_value
    return int(math.prod(t.shape.numpy())) if t is not None else 0


def _file_bytes(onnx_path: Path, model) -> int:
    total = onnx_path.stat().st_size
    seen = set()
    for v in model.graph.initializers.values():
        t = v.const_value
        loc = getattr(t, "location", None)
        base = getattr(t, "base_dir", None)
        if loc:
            f = Path(base or onnx_path.parent) / loc
            if f not in seen and f.is_file():
                seen.add(f)
                total += f.stat().st_size
    return total


# --------------------------------------------------------------------------------------------
# structure and linear-layer rows
# --------------------------------------------------------------------------------------------
def _structure_matches(st, model) -> bool:
    nodes = {n.name for n in model.graph}
    inits = model.graph.initializers
    for lin in st.linears():
        for n in lin.nodes or [lin.node]:
            if n not in nodes:
                return False
        if lin.kind == "dense" and lin.weight:
            w = inits.get(lin.weight)
            if w is None or w.shape is None:
                return False
            shape = list(w.shape)
            expected = [lin.K, lin.N] if lin.columns is None else [lin.K, shape[-1]]  # packed: a column range
            if lin.role != "lm_head" and (shape != expected or (lin.columns and lin.columns[1] > shape[-1])):
                return False
    return True


def get_structure(model, meta: dict | None):
    """(ModelStructure or None, where it came from, error message or None)."""
    from compiler.structure import ModelStructure

    if meta and meta.get("structure"):
        try:
            st = ModelStructure.from_json(meta["structure"])
            if _structure_matches(st, model):
                return st, "llmfold.json", None
        except (TypeError, KeyError, ValueError):
            pass
    try:
        from compiler.analyze import analyze

        return analyze(model), "analysis", None
    except UserError as e:
        return None, "analysis", str(e)
    except Exception as e:  # any graph that is not a decoder analysis understands: report it
        return None, "analysis", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _share(lin, weight: str, by_name) -> int:
    """How much of a weight several layers read is this layer's: its columns (packed q/k/v: N); for
    low-rank pairs sharing a first factor (passes/pack_lowrank.py) its rank in the shared W₁ (the
    layers have the same K) and rank·N in a block-diagonal W₂."""
    if not lin.rank_columns:
        return lin.N
    first = by_name.get(lin.nodes[0]) if lin.nodes else None
    if first is not None and any(v is not None and v.name == weight for v in first.inputs):
        return lin.rank
    return lin.rank * lin.N


def linear_rows(model, st) -> list[dict]:
    """One dict per linear layer (see the module docstring for the fields)."""
    graph = model.graph
    inits = graph.initializers
    by_name = {n.name: n for n in graph}
    lins = st.linears()
    used: dict[str, set[str]] = {}
    for lin in lins:
        names = set()
        for nn in lin.nodes or [lin.node]:
            node = by_name.get(nn)
            if node is None:
                continue
            for v in node.inputs:
                if v is not None and v.name in inits:
                    names.add(v.name)
        if lin.weight and lin.weight in inits:
            names.add(lin.weight)
        used[lin.name] = names
    sharers: dict[str, list] = defaultdict(list)
    for lin in lins:
        for n in used[lin.name]:
            sharers[n].append(lin)
    rows = []
    for lin in lins:
        nbytes = 0.0
        for n in used[lin.name]:
            share = sharers[n]
            nbytes += _tensor_bytes(inits[n]) * (_share(lin, n, by_name) / sum(_share(x, n, by_name) for x in share)
                                                 if len(share) > 1 else 1.0)
        if lin.kind == "low-rank" and lin.rank:
            macs = lin.rank * (lin.K + lin.N)
        else:
            macs = lin.K * lin.N
        if lin.kind == "int4" or (lin.kind == "low-rank" and lin.bits):
            bits = lin.bits or 4
        else:
            w = inits.get(lin.weight) if lin.weight else None
            if w is None:
                w = next((inits[n] for n in used[lin.name] if inits[n].shape is not None and len(inits[n].shape) == 2),
                         None) or next((inits[n] for n in used[lin.name]), None)  # [K, N], or PackedMatMul's tiles
            bits = int(w.dtype.itemsize * 8) if w is not None and w.dtype is not None else None
        rows.append(
            {
                "name": lin.name,
                "block": lin.block,
                "role": lin.role,
                "K": lin.K,
                "N": lin.N,
                "kind": lin.kind,
                "bits": bits,
                "group": lin.block_size,
                "rank": lin.rank,
                "act_bits": lin.act_bits,
                "hadamard": lin.hadamard,
                "bytes": int(round(nbytes)),
                "macs_per_token": int(macs),
                # columns [start, stop) of a node several roles share (packed q/k/v), else None
                "packed_columns": list(lin.columns) if lin.columns else None,
                # columns [start, stop) of a first factor several low-rank pairs share, else None
                "shared_rank_columns": list(lin.rank_columns) if lin.rank_columns else None,
                # tied: the lm_head reads the embedding initializer itself (not a copy of it)
                "tied": bool(lin.role == "lm_head" and st.embedding is not None and st.embedding in used[lin.name]),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------
def _try_load_library(path: Path | None) -> tuple[bool, str | None]:
    if path is None:
        return False, "no library known for this domain"
    if not Path(path).is_file():
        return False, f"{path} not found (build it with `make setup`)"
    import onnxruntime as ort

    so = ort.SessionOptions()
    try:
        so.register_custom_ops_library(str(path))
        return True, None
    except Exception as e:
        return False, " ".join(str(e).split())[:200]


def custom_op_report(model, meta: dict | None) -> list[dict]:
    local_functions = {f.domain for f in model.functions.values()} if hasattr(model, "functions") else set()
    counts: dict[str, Counter] = defaultdict(Counter)
    for node in _all_nodes(model):
        d = node.domain or ""
        if d not in BUILTIN_DOMAINS and d not in local_functions:
            counts[d][node.op_type] += 1
    out = []
    for domain, ops in sorted(counts.items()):
        lib = None
        if domain == "llmfold":
            try:
                from compiler.custom_ops import library_path

                lib = Path(library_path())
            except UserError as e:
                out.append({"domain": domain, "ops": dict(ops), "library": (meta or {}).get("custom_ops_library"), "loads": False, "error": str(e)})
                continue
            except Exception as e:  # the library module itself missing or broken
                out.append({"domain": domain, "ops": dict(ops), "library": (meta or {}).get("custom_ops_library"), "loads": False, "error": f"{type(e).__name__}: {e}"})
                continue
        loads, err = _try_load_library(lib)
        out.append({"domain": domain, "ops": dict(ops), "library": str(lib) if lib else None, "loads": loads, "error": err})
    return out


def _all_nodes(model):
    import onnx_ir as ir

    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for f in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(f)


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def inspect_model(path) -> dict:
    """Everything `inspect` reports, as a JSON-ready dict."""
    onnx_path, meta = _resolve(path)
    model = _load(onnx_path)
    g = model.graph
    ops = Counter()
    for node in _all_nodes(model):
        ops[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    by_dtype: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for v in g.initializers.values():
        e = by_dtype[_dtype_name(v.const_value.dtype if v.const_value is not None else v.dtype)]
        e["tensors"] += 1
        e["parameters"] += _tensor_numel(v)
        e["bytes"] += _tensor_bytes(v)
    st, source, err = get_structure(model, meta)
    rows = linear_rows(model, st) if st is not None else []
    embedding_bytes = None
    if st is not None and st.embedding and st.embedding in g.initializers:
        embedding_bytes = _tensor_bytes(g.initializers[st.embedding])
    report = {
        "path": str(onnx_path),
        "llmfold_dir": meta is not None,
        "ir_version": model.ir_version,
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "opsets": dict(sorted(model.opset_imports.items())),
        "domains": sorted({n.domain or "ai.onnx" for n in _all_nodes(model)}),
        "inputs": [{"name": v.name, "dtype": _dtype_name(v.dtype), "shape": _dims(v)} for v in g.inputs],
        "outputs": [{"name": v.name, "dtype": _dtype_name(v.dtype), "shape": _dims(v)} for v in g.outputs],
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "initializers_by_dtype": dict(sorted(by_dtype.items())),
        "parameters": sum(e["parameters"] for e in by_dtype.values()),
        "initializer_bytes": sum(e["bytes"] for e in by_dtype.values()),
        "file_bytes": _file_bytes(onnx_path, model),
        "custom_ops": custom_op_report(model, meta),
        "structure_source": source if st is not None else None,
        "structure_error": err,
        "unrecognized": list(st.unrecognized) if st is not None else [],
        "linear_layers": rows,
        "linear_bytes": sum(r["bytes"] for r in rows if not r["tied"]),
        "macs_per_token": sum(r["macs_per_token"] for r in rows),
        "embedding_bytes": embedding_bytes,
    }
    if st is not None:
        report["model"] = {
            "blocks": len(st.blocks),
            "hidden_size": st.hidden_size,
            "intermediate_size": st.intermediate_size,
            "heads": st.num_heads,
            "kv_heads": st.num_kv_heads,
            "head_dim": st.head_dim,
            "vocab_size": st.vocab_size,
            "tied_embeddings": st.tied_embeddings,
            "rope_theta": st.rope_theta,
        }
    if meta is not None:
        report["passes"] = meta.get("passes", [])
        report["kv_cache"] = meta.get("kv_cache", "uniform")
    return report


_DIFF_FIELDS = ("kind", "K", "N", "bits", "group", "rank", "act_bits", "hadamard", "packed_columns", "shared_rank_columns", "bytes",
                "macs_per_token")


def diff_reports(a: dict, b: dict) -> dict:
    """Per-layer changes a → b (fields that differ), layers only in one, and totals."""
    ra = {r["name"]: r for r in a["linear_layers"]}
    rb = {r["name"]: r for r in b["linear_layers"]}
    changed = []
    for name in ra:
        if name in rb:
            ch = {f: [ra[name].get(f), rb[name].get(f)] for f in _DIFF_FIELDS if ra[name].get(f) != rb[name].get(f)}
            if ch:
                changed.append({"name": name, "changes": ch})
    totals = {}
    for key in ("file_bytes", "initializer_bytes", "parameters", "linear_bytes", "macs_per_token", "nodes"):
        totals[key] = [a[key], b[key]]
    ops = {}
    for op in sorted(set(a["ops"]) | set(b["ops"])):
        if a["ops"].get(op, 0) != b["ops"].get(op, 0):
            ops[op] = [a["ops"].get(op, 0), b["ops"].get(op, 0)]
    return {
        "from": a["path"],
        "to": b["path"],
        "changed_layers": changed,
        "unchanged_layers": sum(1 for n in ra if n in rb) - len(changed),
        "only_in_from": [n for n in ra if n not in rb],
        "only_in_to": [n for n in rb if n not in ra],
        "totals": totals,
        "ops": ops,
    }


def write_svg(report: dict, out) -> Path:
    """Stacked bar chart: bytes (MiB) per decoder block (and lm_head/embedding), stacked by role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["linear_layers"]
    if not rows:
        raise UserError(f"{report['path']}: no linear layers recognized, nothing to draw; see `llmfold inspect` for what analysis found")
    blocks = sorted({r["block"] for r in rows if r["block"] is not None})
    cats = [str(b) for b in blocks]
    extra = []
    if any(r["role"] == "lm_head" for r in rows):
        extra.append("lm_head")
    if report.get("embedding_bytes") and not any(r["tied"] for r in rows):
        extra.append("embedding")
    cats += extra
    roles = [r for r in _ROLE_ORDER if any(x["role"] == r for x in rows)] + (["embedding"] if "embedding" in extra else [])
    data = {role: [0.0] * len(cats) for role in roles}
    for r in rows:
        i = cats.index("lm_head") if r["role"] == "lm_head" else blocks.index(r["block"])
        data[r["role"]][i] += r["bytes"] / 2**20
    if "embedding" in extra:
        data["embedding"][cats.index("embedding")] = report["embedding_bytes"] / 2**20
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(cats) + 2), 4.5))
    bottom = [0.0] * len(cats)
    cmap = plt.get_cmap("tab10")
    for k, role in enumerate(roles):
        ax.bar(cats, data[role], bottom=bottom, label=role, color=cmap(k % 10), width=0.8)
        bottom = [x + y for x, y in zip(bottom, data[role])]
    ax.set_xlabel("decoder block")
    ax.set_ylabel("MiB")
    ax.set_title(f"bytes per block and role — {Path(report['path']).parent.name}/{Path(report['path']).name}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.tick_params(axis="x", labelsize=7, rotation=90 if len(cats) > 12 else 0)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fmt = out.suffix[1:].lower() if out.suffix.lower() in (".png", ".pdf") else "svg"
    fig.savefig(tmp, format=fmt)
    plt.close(fig)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------
def _mb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _shape(s) -> str:
    from rich.markup import escape

    return "?" if s is None else escape("[" + ", ".join(str(d) for d in s) + "]")


def _layer_brief(r: dict) -> str:
    s = f"{r['kind']} {r['K']}×{r['N']}"
    if r["kind"] == "low-rank":
        s += f" r={r['rank']}"
    if r["kind"] == "int4" or (r["kind"] == "low-rank" and r.get("group")):
        s += f" {r['bits']}b g{r['group']}"
        if r.get("act_bits"):
            s += f" a{r['act_bits']}"
        if r.get("hadamard"):
            s += f" H{r['hadamard']}"
    elif r["bits"]:
        s += f" fp{r['bits']}"
    return s + f" {_mb(r['bytes'])}"


def print_report(rep: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]{escape(rep['path'])}[/bold]  ({'llmfold model directory' if rep['llmfold_dir'] else 'plain ONNX'})")
    console.print(
        f"IR version {rep['ir_version']}, producer {rep['producer'] or '-'}; opsets "
        + ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in rep["opsets"].items())
        + f"; {rep['nodes']} nodes; file {_mb(rep['file_bytes'])}"
    )
    if "model" in rep:
        m = rep["model"]
        console.print(
            f"{m['blocks']} blocks, hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, heads {m['heads']}/{m['kv_heads']} kv, "
            f"head_dim {m['head_dim']}, vocab {m['vocab_size']}, tied embeddings {m['tied_embeddings']} (structure from {rep['structure_source']})"
        )
    if rep.get("passes"):
        console.print("passes applied: " + escape(", ".join(p.get("name", "?") if isinstance(p, dict) else str(p) for p in rep["passes"])))

    t = Table(title="graph I/O")
    for c in ("", "name", "dtype", "shape"):
        t.add_column(c)
    for kind in ("inputs", "outputs"):
        for v in rep[kind]:
            t.add_row(kind[:-1], escape(v["name"]), v["dtype"], _shape(v["shape"]))
    console.print(t)

    t = Table(title="ops")
    t.add_column("op")
    t.add_column("count", justify="right")
    for op, n in rep["ops"].items():
        t.add_row(op, str(n))
    console.print(t)

    t = Table(title="initializers by dtype")
    for c in ("dtype", "tensors", "parameters", "bytes"):
        t.add_column(c, justify="right" if c != "dtype" else "left")
    for dt, e in rep["initializers_by_dtype"].items():
        t.add_row(dt, str(e["tensors"]), f"{e['parameters']:,}", _mb(e["bytes"]))
    t.add_row("total", "", f"{rep['parameters']:,}", _mb(rep["initializer_bytes"]))
    console.print(t)

    if rep["custom_ops"]:
        t = Table(title="custom-domain ops")
        for c in ("domain", "ops", "library", "loads"):
            t.add_column(c)
        for c in rep["custom_ops"]:
            ok = "[green]yes[/green]" if c["loads"] else f"[red]no[/red] ({escape(str(c['error']))})"
            t.add_row(c["domain"], ", ".join(f"{k}×{v}" for k, v in c["ops"].items()), c["library"] or "-", ok)
        console.print(t)

    if rep["linear_layers"]:
        t = Table(title=f"linear layers ({len(rep['linear_layers'])}; {_mb(rep['linear_bytes'])}, {rep['macs_per_token']:,} MACs/token)")
        for c in ("block", "role", "K×N", "kind", "bits", "act", "group", "rank", "bytes", "MACs/token"):
            t.add_column(c, justify="right" if c in ("bytes", "MACs/token", "bits", "act", "group", "rank") else "left", no_wrap=True)
        for r in rep["linear_layers"]:
            t.add_row(
                "-" if r["block"] is None else str(r["block"]),
                r["role"] + (" (tied)" if r["tied"] else ""),
                f"{r['K']}×{r['N']}",
                r["kind"],
                str(r["bits"] or "-"),
                str(r["act_bits"] or "-") + (f" H{r['hadamard']}" if r.get("hadamard") else ""),
                str(r["group"] or "-"),
                str(r["rank"] or "-"),
                _mb(r["bytes"]),
                f"{r['macs_per_token']:,}",
            )
        console.print(t)
    if rep["structure_error"]:
        console.print(f"[yellow]structure analysis failed:[/yellow] {escape(rep['structure_error'])}")
    if rep["unrecognized"]:
        console.print("[yellow]not recognized:[/yellow] " + escape("; ".join(rep["unrecognized"])))


def print_diff(d: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]diff[/bold] {escape(d['from'])} → {escape(d['to'])}")
    t = Table(title="totals")
    for c in ("", "before", "after"):
        t.add_column(c, justify="right" if c else "left")
    for k, (x, y) in d["totals"].items():
        f = _mb if "bytes" in k else (lambda n: f"{n:,}")
        t.add_row(k, f(x), f(y))
    console.print(t)
    if d["ops"]:
        console.print("op counts changed: " + ", ".join(f"{op} {x}→{y}" for op, (x, y) in d["ops"].items()))
    if d["changed_layers"]:
        t = Table(title=f"changed layers ({len(d['changed_layers'])}; {d['unchanged_layers']} unchanged)")
        t.add_column("layer")
        t.add_column("changes")
        for c in d["changed_layers"]:
            parts = []
            for f, (x, y) in c["changes"].items():
                if f == "bytes":
                    parts.append(f"bytes {_mb(x)} → {_mb(y)}")
                else:
                    parts.append(f"{f} {x} → {y}")
            t.add_row(escape(c["name"]), escape("; ".join(parts)))
        console.print(t)
    else:
        console.print(f"no linear layer changed ({d['unchanged_layers']} compared)")
    for key, label in (("only_in_from", "only in before"), ("only_in_to", "only in after")):
        if d[key]:
            console.print(f"{label}: " + escape(", ".join(d[key])))


def inspect_path(path, as_json: bool = False, diff=None, svg=None) -> int:
    """The CLI command: print the report (rich tables, or one JSON object with --json)."""
    rep = inspect_model(path)
    if diff is not None:
        rep["diff"] = diff_reports(rep, inspect_model(diff))
    if svg is not None:
        rep["svg"] = str(write_svg(rep, svg))
    if as_json:
        print(json.dumps(rep))
        return 0
    from rich.console import Console

    import sys

    console = Console(width=None if sys.stdout.isatty() else 160)  # files/pipes: don't squeeze tables to 80 columns
    print_report(rep, console)
    if "diff" in rep:
        print_diff(rep["diff"], console)
    if "svg" in rep:
        from rich.markup import escape

        console.print(f"wrote {escape(rep['svg'])}")
    return 0
