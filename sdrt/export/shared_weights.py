"""A graph over another graph's weights file: the residual UNet graphs read the UNet's ``model.onnx.data``."""

from __future__ import annotations

from pathlib import Path

from sdrt.errors import UserError


def share_weights(graph: Path, base_graph: Path, out: Path) -> None:
    """Write ``graph`` to ``out`` with each of its external weights read from ``base_graph``'s data file instead of
    its own, renamed to the base graph's name for it (where that name is free): matched by name and bytes, else by
    bytes alone. A weight the base graph lacks means the two were not traced from the same weights: refused."""
    import hashlib

    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    base = onnx.load(str(base_graph), load_external_data=False)

    def location(t) -> tuple[str, int, int]:
        info = {e.key: e.value for e in t.external_data}
        return info["location"], int(info.get("offset") or 0), int(info["length"])

    base_ext = [t for t in base.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    files = {location(t)[0] for t in base_ext}
    if len(files) != 1:
        raise UserError(f"{base_graph}: its weights are not in one external-data file; export the model again")
    base_file = base_graph.parent / files.pop()
    by_name = {t.name: t for t in base_ext}
    by_digest: dict | None = None
    taken = {t.name for t in model.graph.initializer} | {i for n in model.graph.node for i in (*n.input, *n.output)}
    renames: dict[str, str] = {}
    with open(base_file, "rb") as bf, open(graph.parent / "model.onnx.data", "rb") as own:
        def read(f, t) -> bytes:
            _, offset, length = location(t)
            f.seek(offset)
            return f.read(length)

        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            if location(t)[0] != "model.onnx.data":
                raise UserError(f"{graph}: weights in {location(t)[0]}, expected model.onnx.data")
            data, key = read(own, t), (t.data_type, tuple(t.dims))
            match = by_name.get(t.name)
            if match is None or (match.data_type, tuple(match.dims)) != key or read(bf, match) != data:
                if by_digest is None:
                    by_digest = {(b.data_type, tuple(b.dims), hashlib.sha256(read(bf, b)).digest()): b
                                 for b in base_ext}
                match = by_digest.get((*key, hashlib.sha256(data).digest()))
            if match is None:
                raise UserError(f"{graph.name}: weight {t.name!r} is not in {base_file} (the engine's UNet was "
                                "exported from other weights; export it again)")
            if match.name != t.name and match.name not in taken:
                renames[t.name] = match.name
                taken.add(match.name)
                t.name = match.name
            del t.external_data[:]
            for k, v in zip(("location", "offset", "length"), location(match)):
                e = t.external_data.add()
                e.key, e.value = k, str(v)
    if renames:  # the base graph's names, so run-time weight overrides (LoRAs) find them here too
        for node in model.graph.node:
            if any(i in renames for i in node.input):
                node.input[:] = [renames.get(i, i) for i in node.input]
    onnx.save_model(model, str(out))
