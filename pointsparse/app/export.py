"""Write a segmentation checkpoint as a torch.export program (.pt2).

``pointsparse export --checkpoint DIR/checkpoint.pt --out model.pt2
[--inference fused|bf16]``: the checkpoint's model (dense, channel-pruned or
vector-masked) in eval mode as a program of plain tensors, ``(feats (N,
in_channels) float32, coords (N, 4) int32) -> logits (N, classes)`` (bfloat16
feats and logits with ``--inference bf16``; an SPVCNN's program also takes its
points and gives their logits, float32 from its point branch in every form), with the checkpoint's config in the file
(:mod:`pointsparse.export` holds the library functions it calls)."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import export

__all__ = ["add_arguments", "main"]


def add_arguments(parser) -> None:
    from .evaluate import INFERENCE

    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by pointsparse train")
    parser.add_argument("--out", required=True, help="the .pt2 file to write (its folder is made where it does not "
                        "exist)")
    parser.add_argument("--inference", choices=INFERENCE, default="float32",
                        help="the program's model: float32 (the checkpoint's, default), fused (pruning masks made "
                             "permanent, BatchNorm folded) or bf16 (fused, then bfloat16: feats and logits "
                             "bfloat16, SPVCNN's point branch and logits float32; the AVX512-BF16 kernels where "
                             "the CPU has them); as pointsparse eval --inference scores it")


def main(args) -> int:
    from ..checkpoint import make_directory
    from ..models import SPVCNN
    from .evaluate import checkpoint_model, inference_model
    from .scoring import feats_dtype
    from .train import load_checkpoint

    out, checkpoint = Path(args.out), Path(args.checkpoint)
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise ValueError(f"--out {out} is the checkpoint it would export (--checkpoint); give another file for "
                         "the program (e.g. model.pt2)")
    if not out.is_dir() and out.suffix.lower() != ".pt2":  # (a folder: check_out_path names it as one)
        raise ValueError(f"--out {out}: a program file ends in .pt2 (the archive torch.export.load reads)")
    state = load_checkpoint(args.checkpoint)  # (export.load_checkpoint's model, and the run's data for the meta)
    model, config = checkpoint_model(state, args.checkpoint).eval(), state["config"]
    if not out.is_dir() and not out.parent.exists():
        # (as eval's and predict's --out: made, where it can be, before the export's work; after the checkpoint
        # is read, so that a missing or bad one leaves no empty folder)
        make_directory(out.parent, f"--out {out}: its folder")
    export.check_out_path(args.out)  # before the export's work
    model = inference_model(model, args.inference)
    dtype = feats_dtype(model, torch.float32)
    point_level = isinstance(model, SPVCNN)
    example = export.example_input(config["in_channels"], config.get("voxel_size", 0.2), points=point_level)
    voxels = example[0] if point_level else example
    voxels = voxels.with_feats(voxels.feats.to(dtype))
    program = export.export_model(model, (voxels, *example[1:]) if point_level else voxels)
    kind = str(dtype).replace("torch.", "")
    inputs = {"feats": f"{kind} (N, in_channels)", "coords": "int32 (N, 4) [batch, x, y, z]"}
    if point_level:  # (its point branch, which gives the logits, runs in float32 in every form)
        inputs.update(inverse="int64 (P,) voxel row of each point", points="float32 (P, 3) in voxel units",
                      point_batch="int64 (P,) batch index of each point")
    logits = "float32" if point_level else kind
    rows = "P" if point_level else "N"
    output = f"{logits} ({rows}, num_classes) logits"
    if export.output_kind(program) == "sparse":  # (a VoxelPrune at stride 1: logits of the kept voxels)
        rows = "M"
        output = (f"{logits} (M, num_classes) logits of the M voxels the model kept (a VoxelPrune at stride 1), "
                  "their coords int32 (M, 4) and stride int32 (3,)")
        if export.ProgramModel(program).records_kept:
            output += ", then the selection's record: their rows int64 (M,) among the N input voxels, and N (int)"
    meta = {"inputs": inputs, "output": output,
            "inference": args.inference, **config,
            # the data the run trained and validated on: pointsparse eval --program scores it by default
            "val_paths": state.get("val_paths") or [], "train_args": state.get("args") or {}}
    export.save(program, args.out, meta)
    takes = ", inverse (P,), points (P, 3), point_batch (P,)" if point_level else ""
    print(f"wrote {args.out}: {type(model).__name__} (feats (N, {config['in_channels']}), coords (N, 4){takes}) -> "
          f"logits ({rows}, {len(config['classes'])}{', on the kept voxels' if rows == 'M' else ''}); load with "
          "pointsparse.export.ProgramModel.load or torch.export.load after `import pointsparse`")
    return 0
