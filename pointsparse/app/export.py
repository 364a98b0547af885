"""Write a segmentation checkpoint as a torch.export program (.pt2).

``pointsparse export --checkpoint DIR/checkpoint.pt --out model.pt2``: the
checkpoint's model (dense or channel-pruned) in eval mode as a program of
plain tensors, ``(feats (N, in_channels) float32, coords (N, 4) int32) ->
logits (N, classes)``, with the checkpoint's config in the file
(:mod:`pointsparse.export` holds the library functions it calls)."""

from __future__ import annotations

from .. import export

__all__ = ["add_arguments", "main"]


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by pointsparse train")
    parser.add_argument("--out", required=True, help="the .pt2 file to write")


def main(args) -> int:
    model, config = export.load_checkpoint(args.checkpoint)
    program = export.export_model(model, export.example_input(config["in_channels"], config.get("voxel_size", 0.2)))
    meta = {"inputs": {"feats": "float32 (N, in_channels)", "coords": "int32 (N, 4) [batch, x, y, z]"},
            "output": "float32 (N, num_classes) logits", **config}
    export.save(program, args.out, meta)
    print(f"wrote {args.out}: {type(model).__name__} (feats (N, {config['in_channels']}), coords (N, 4)) -> "
          f"logits (N, {len(config['classes'])}); load with torch.export.load after `import pointsparse`")
    return 0
