"""``infu generate``: identity-preserved images from id photo(s) and a prompt."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from infu.config import ConfigError, InfuConfig, load_config
from infu.face import BadImageError, FaceAnalyzer, NoFaceError, load_face_analyzer

MAX_IMAGE_SIDE = 4096
"""Largest width or height ``infu generate`` accepts (FLUX.1 works up to about 2 megapixels)."""


def generate(
    config: InfuConfig,
    id_images: Sequence[Path],
    prompt: str,
    out: Path,
    control_image: Path | None = None,
    seed: int = 42,
    id_weights: Sequence[float] | None = None,
) -> Path:
    """Generate one image with ``config.model`` (its inference settings) and write it as PNG to ``out``
    (in an existing folder).

    ``control_image`` is the pose photo, prepared as the release does. The photos are checked (faces
    found, identities mixed, control drawn) before any model loads.
    """
    import torch

    from infu.model.conditioning import identity_from_images, keypoint_control
    from infu.model.factory import build_pipeline

    inference = config.model.inference
    analyzer = load_face_analyzer(config.face)
    if config.model.family == "infinite_id":
        return _generate_infinite_id(config, analyzer, id_images, prompt, out, seed, id_weights)
    embedding = identity_from_images(analyzer, id_images, id_weights)
    control = (
        None
        if control_image is None
        else keypoint_control(analyzer, control_image, inference.width, inference.height)
    )
    pipeline = build_pipeline(config.model, face_analyzer=analyzer)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        prompt, id_embedding=embedding, control_drawing=control, generator=torch.Generator().manual_seed(seed)
    ).images[0]
    image.save(out, format="PNG")
    return out


def _generate_infinite_id(
    config: InfuConfig,
    analyzer: FaceAnalyzer,
    id_images: Sequence[Path],
    prompt: str,
    out: Path,
    seed: int,
    id_weights: Sequence[float] | None,
) -> Path:
    """:func:`generate` for ``model.family: infinite_id``: the photos' faces are found (once) before the
    models load; the mode, AdaIN and identity scale come from ``model.infinite_id``."""
    import torch

    from infu.model.conditioning import describe, required_face
    from infu.model.factory import build_infinite_id_pipeline

    photos = [analyzer.load(image) for image in id_images]
    faces = [
        required_face(analyzer, rgb, describe(image)) for rgb, image in zip(photos, id_images, strict=True)
    ]
    pipeline = build_infinite_id_pipeline(config.model, face_analyzer=analyzer)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        identities = [
            pipeline.encode_identity(*pipeline.aligned_face_features(rgb, face))[0]
            for rgb, face in zip(photos, faces, strict=True)
        ]
    image = pipeline(
        prompt,
        id_embeddings=identities,
        id_weights=id_weights,
        generator=torch.Generator().manual_seed(seed),
        **config.model.infinite_id_sampling(),
    ).images[0]
    image.save(out, format="PNG")
    return out


def _check_request(config: InfuConfig, out: Path, control_image: Path | None) -> None:
    """Refuse, before anything loads, a pose control the model family has none for, an image size beyond
    :data:`MAX_IMAGE_SIDE` and an ``out`` that is a folder or whose folder does not exist."""
    inference = config.model.inference
    if control_image is not None and config.model.family != "infu":
        raise typer.BadParameter(
            f"model.family {config.model.family} takes no pose control", param_hint="--control-image"
        )
    if max(inference.width, inference.height) > MAX_IMAGE_SIDE:
        raise typer.BadParameter(
            f"{inference.width}x{inference.height}: width and height must be at most {MAX_IMAGE_SIDE}",
            param_hint="--width/--height",
        )
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a folder; give the path of the PNG to write", param_hint="--out")
    if not out.parent.is_dir():
        raise typer.BadParameter(f"folder {out.parent} does not exist", param_hint="--out")


def _image_hint(error: NoFaceError | BadImageError, control_image: Path | None) -> str:
    named_control = control_image is not None and str(control_image) in str(error)
    return "--control-image" if named_control else "--id-image"


def generate_command(
    id_image: Annotated[
        list[Path],
        typer.Option(
            "--id-image", help="identity photo; repeat to mix identities", exists=True, dir_okay=False
        ),
    ],
    prompt: Annotated[str, typer.Option(help="what to generate")],
    out: Annotated[Path, typer.Option(help="PNG to write (its folder must exist)")] = Path("generated.png"),
    control_image: Annotated[
        Path | None,
        typer.Option(
            help="pose photo, resized and padded to the image size as the release does; its largest face's "
            "keypoints set the pose (default: no pose control)",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    config: Annotated[Path, typer.Option(help="run config YAML")] = Path("configs/embedded.yaml"),
    seed: Annotated[int, typer.Option(help="noise seed (a torch.Generator)")] = 42,
    steps: Annotated[int | None, typer.Option(min=1, help="denoising steps (default: config)")] = None,
    width: Annotated[
        int | None,
        typer.Option(min=16, help=f"image width, a multiple of 16 up to {MAX_IMAGE_SIDE} (default: config)"),
    ] = None,
    height: Annotated[
        int | None,
        typer.Option(min=16, help=f"image height, a multiple of 16 up to {MAX_IMAGE_SIDE} (default: config)"),
    ] = None,
    id_weights: Annotated[
        list[float] | None,
        typer.Option("--id-weight", help="mixing weight per --id-image, in order (default: equal)"),
    ] = None,
) -> None:
    """Generate an identity-preserved image with InfU (or Infinite-ID: model.family in the config)."""
    from infu.model.mixing import normalise_weights

    settings = {"num_steps": steps, "width": width, "height": height}
    overrides = [f"model.inference.{key}={value}" for key, value in settings.items() if value is not None]
    try:
        run_config = load_config(config, overrides)
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--config/--steps/--width/--height") from None
    _check_request(run_config, out, control_image)
    id_weights = id_weights or None
    try:
        normalise_weights(id_weights, len(id_image))
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--id-weight") from None
    try:
        written = generate(
            run_config,
            id_image,
            prompt,
            out,
            control_image=control_image,
            seed=seed,
            id_weights=id_weights,
        )
    except (NoFaceError, BadImageError) as error:
        raise typer.BadParameter(str(error), param_hint=_image_hint(error, control_image)) from None
    typer.echo(f"wrote {written}")
