r"""`semantica-demo`: a web page to try an export: drop an image, get its variations.

  semantica-demo --export DIR [--port 7860] [--host 127.0.0.1] [--max_upload_mb 8]

Upload an image (or pick one of the held-out examples the export ships in DIR/examples/),
choose the number of variations, sampler steps, guidance and seed, and the page shows the grid
(condition | variations, the same grid `semantica-vary` writes) with a progress bar while it
samples. The same (image, settings, seed) gives the same grid. Built with Gradio (the `[demo]`
extra): it installs beside the project's exact pins.

Safety: it listens on 127.0.0.1 unless --host says otherwise and never creates a public share
link; uploads are capped (--max_upload_mb, and --max_pixels per image); one sampling job runs
at a time and at most --max_queue wait; the page can only read the export it was started with
(the sampling function accepts only files Gradio received in this run's upload folder or the
export's examples, and Gradio serves nothing else). A bad upload (not an image, empty, too
large) gets a one-line message in the page; the server stays up.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home; the page works offline

STEP_CHOICES = (25, 50, 100, 200)
GUIDANCE_MAX = 4.0


class DemoError(ValueError):
    """A request the page answers with a message (bad upload or settings)."""


class VariationService:
    """The export, loaded once, and one sampler per settings (compiled on first use)."""

    def __init__(self, export_dir: str, *, chunk: int = 4, max_num: int = 16, max_pixels: int = 4096 * 4096,
                 sampler: str = "ddim"):
        from semantica_jax import export as export_lib, model_card

        self.model = export_lib.load_export(export_dir)  # ExportError names what is wrong
        self.export_dir = self.model.path
        self.max_num, self.max_pixels, self.sampler_name = int(max_num), int(max_pixels), sampler
        self._sampler = self.model.sampler(batch_size=chunk)
        self._compiled: set = set()
        self._lock = threading.Lock()  # one sampling job at a time (the queue also allows only one)
        examples = os.path.join(self.export_dir, model_card.EXAMPLES_DIR)
        self.examples = sorted(os.path.join(examples, f) for f in os.listdir(examples)
                               if f.lower().endswith(".png")) if os.path.isdir(examples) else []
        self.allowed_dirs = [os.path.realpath(examples)]

    def check_upload(self, path: str | None) -> str:
        """The upload's path if the page may read it; DemoError with the reason otherwise."""
        if not path:
            raise DemoError("choose an image first (upload one or click an example)")
        real = os.path.realpath(path)
        if not any(real == d or real.startswith(d + os.sep) for d in self.allowed_dirs):
            raise DemoError("that file did not come from this page")
        if not os.path.isfile(real):
            raise DemoError("the uploaded file is gone; upload it again")
        if os.path.getsize(real) == 0:
            raise DemoError(f"{os.path.basename(path)} is empty")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(real) as im:  # reads the header only
                w, h = im.size
        except (UnidentifiedImageError, OSError):
            w = h = None  # let the decoder below name the problem
        except Image.DecompressionBombError:
            raise DemoError(f"{os.path.basename(path)} is too large to decode") from None
        if w is not None and w * h > self.max_pixels:
            raise DemoError(f"{os.path.basename(path)} is {w}x{h} px; the demo accepts at most "
                            f"{self.max_pixels:,} pixels")
        return real

    def vary(self, path: str | None, num: int, steps: int, guidance: float, seed: int, progress=None,
             name: str | None = None) -> tuple[np.ndarray, str]:
        """(the grid as uint8 [H, W, 3], a one-line description) for one uploaded image."""
        from semantica_jax import images as images_lib, sampling, vary as vary_lib

        real = self.check_upload(path)
        num, steps, seed = int(num), int(steps), int(seed)
        if not 1 <= num <= self.max_num:
            raise DemoError(f"number of variations must be 1..{self.max_num}, got {num}")
        if steps not in STEP_CHOICES:
            raise DemoError(f"steps must be one of {STEP_CHOICES}, got {steps}")
        if not 0.0 <= float(guidance) <= GUIDANCE_MAX:
            raise DemoError(f"guidance must be in [0, {GUIDANCE_MAX:g}], got {guidance}")
        if seed < 0:
            raise DemoError(f"seed must be >= 0, got {seed}")
        c = self.model.config
        try:
            cond = vary_lib.load_image(real, int(c.encoder.image_size))
            shown = vary_lib.load_image(real, int(c.data.image_size), str(c.data.target_fit))
        except vary_lib.VaryError as e:
            raise DemoError(str(e).replace(real, name or os.path.basename(real))) from None
        settings = sampling.SamplerSettings(self.sampler_name, steps, float(guidance), (0.0, 1.0))
        keys = sampling.sample_keys(seed, np.arange(num))
        t0 = time.perf_counter()
        with self._lock:
            if progress is not None:
                progress(0.0, desc="compiling the sampler for these settings (once)"
                         if settings not in self._compiled else "sampling")

            def report(done: int, total: int) -> None:
                if progress is not None:
                    progress(done / total, desc=f"sampled {done}/{total}")

            samples = self._sampler.generate(self.model.ema_params, self.model.encoder_params(),
                                             np.repeat(cond[None], num, axis=0), keys, settings, progress=report)
            self._compiled.add(settings)
        label = name or os.path.basename(real)
        grid = images_lib.variation_grid(shown[None], samples, num, int(c.data.image_size), row_labels=[label])
        text = (f"{num} variations of {label}: {settings.describe()}, seed {seed} "
                f"({time.perf_counter() - t0:.1f} s)")
        return grid, text


def build_app(service: VariationService):
    """The Gradio Blocks of the page (not launched)."""
    import gradio as gr

    m = service.model

    def on_vary(file, num, steps, guidance, seed, progress=gr.Progress()):
        name = None
        if isinstance(file, str):
            name = os.path.basename(file)
        try:
            grid, text = service.vary(file, num, steps, guidance, seed, progress=progress, name=name)
        except DemoError as e:
            return None, f"**Could not vary this image:** {e}"
        return grid, text

    with gr.Blocks(title="Semantica variations") as app:
        gr.Markdown(
            f"## Semantica: variations of an image\n"
            f"Export `{os.path.basename(m.path)}` (step {m.step:,}, {int(m.info.get('num_params', 0)):,} "
            f"denoiser parameters, {m.config.data.image_size} px). Upload an image or pick an example; the "
            f"model draws new images meant to keep its semantics. Same image + settings + seed = same grid.")
        with gr.Row():
            with gr.Column(scale=1):
                file = gr.File(label="image", file_types=["image"], type="filepath", elem_id="upload")
                num = gr.Slider(1, service.max_num, value=min(8, service.max_num), step=1,
                                label="variations", elem_id="num")
                steps = gr.Dropdown(list(STEP_CHOICES), value=50, label=f"{service.sampler_name.upper()} steps",
                                    elem_id="steps")
                guidance = gr.Slider(0.0, GUIDANCE_MAX, value=2.0, step=0.5, label="guidance", elem_id="guidance")
                seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="seed")
                button = gr.Button("Vary", variant="primary", elem_id="vary")
                if service.examples:
                    gr.Examples(examples=[[p] for p in service.examples], inputs=[file],
                                label="held-out examples")
            with gr.Column(scale=2):
                grid = gr.Image(label="condition | variations", show_label=False, type="numpy", format="png",
                                interactive=False, elem_id="grid")  # the grid carries its own headers
                status = gr.Markdown("", elem_id="status")
        button.click(on_vary, inputs=[file, num, steps, guidance, seed], outputs=[grid, status],
                     concurrency_limit=1)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="semantica-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--export", required=True, help="export directory (semantica-export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max_upload_mb", type=float, default=8.0, help="largest accepted upload")
    parser.add_argument("--max_pixels", type=int, default=4096 * 4096, help="largest accepted image (pixels)")
    parser.add_argument("--max_num", type=int, default=16, help="most variations per request")
    parser.add_argument("--max_queue", type=int, default=8, help="requests that may wait for the running one")
    parser.add_argument("--chunk", type=int, default=4, help="images sampled per program call (progress step)")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    args = parser.parse_args(argv)
    from semantica_jax import export as export_lib

    try:
        service = VariationService(args.export, chunk=args.chunk, max_num=args.max_num,
                                   max_pixels=args.max_pixels, sampler=args.sampler)
    except export_lib.ExportError as e:
        print(f"semantica-demo: error: {e}", file=sys.stderr)
        return 2
    # Gradio keeps uploads here; the sampling function reads nothing outside it and the examples.
    upload_dir = tempfile.mkdtemp(prefix="semantica-demo-")
    os.environ["GRADIO_TEMP_DIR"] = upload_dir
    service.allowed_dirs.append(os.path.realpath(upload_dir))
    import gradio as gr

    app = build_app(service)
    app.queue(default_concurrency_limit=1, max_size=int(args.max_queue))
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    print(f"semantica-demo: serving {service.export_dir} on http://{args.host}:{args.port}", flush=True)
    try:
        app.launch(server_name=args.host, server_port=int(args.port), share=False, inbrowser=False,
                   max_file_size=int(args.max_upload_mb * 1024 * 1024), allowed_paths=service.allowed_dirs[:1],
                   ssr_mode=False, mcp_server=False, footer_links=[], quiet=True, theme=theme,
                   show_error=False)
    except OSError as e:  # e.g. the port is taken
        print(f"semantica-demo: error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console-script entry (`semantica-demo`)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
