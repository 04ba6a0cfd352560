"""How live the prompt explorer feels: seconds from Submit, and from a control change, to updated views.

    python benchmarks/explorer_latency.py                     # default model, random MLSAE of its shape
    python benchmarks/explorer_latency.py --sae runs/default/mlsae-...   # a trained MLSAE
    python benchmarks/explorer_latency.py --browser           # also end to end: Voila + headless chromium

Targets (issue 5): a 64-token prompt updates in under 2 s after Submit, a control change in under
0.5 s. The in-process numbers time ``ExplorerApp`` (model forwards, views, widget updates); the
browser numbers add serialisation, the websocket and plotly drawing, from the click until the page
shows the result.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"
TEXT = ("The committee met in the afternoon and discussed the budget for the next year. Members of the public "
        "were invited to send their comments before the end of the month. The report was long, but the summary "
        "was clear, and everyone agreed that the schools, hospitals and roads needed more money than before. ") * 4


def prompt_of(tokenizer, n_tokens: int, salt: int = 0) -> str:
    """A prompt of exactly ``n_tokens`` tokens (``salt`` makes it new, so nothing is cached)."""
    ids = tokenizer(f"{salt}. {TEXT}")["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def random_sae(model: str, n_latents: int, k: int, folder: Path):
    from mlsae.model import MLSAE, SAEConfig
    from mlsae.transformer import Transformer

    tf = Transformer.from_pretrained(model)
    torch.manual_seed(0)
    sae = MLSAE(SAEConfig(n_inputs=tf.d_model, n_latents=n_latents, k=k, n_layers=tf.n_layers, model_name=model))
    sae.save_pretrained(folder)
    return sae, tf


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def in_process(sae, tf, n_tokens: int, repeats: int, precision: str = "fp32") -> dict[str, list[float]]:
    """Time ExplorerApp actions directly (forwards, views and widget updates, no frontend)."""
    from mlsae.explorer import Explorer
    from mlsae.explorer.app import ExplorerApp

    app = ExplorerApp(Explorer(sae, tf, precision=precision))
    app.submit(prompt_of(tf.tokenizer, n_tokens, salt=-1))  # warm-up: first-call costs of torch and plotly
    times: dict[str, list[float]] = {k: [] for k in ("submit", "layer", "latent", "position", "threshold", "factor")}
    layers = app.ex.layers
    for r in range(repeats):
        prompt = prompt_of(tf.tokenizer, n_tokens, salt=r)  # made before the clock starts
        times["submit"].append(timed(lambda: app.submit(prompt)))
        assert app.run.n_tokens == n_tokens, app.run.n_tokens
        times["layer"].append(timed(lambda: setattr(app.layer_box, "value", layers[(r * 7 + 3) % len(layers)])))
        times["latent"].append(timed(lambda: setattr(app.latent_box, "value", (r * 997 + 11) % app.ex.n_latents)))
        times["position"].append(timed(lambda: setattr(app.position_box, "value", (r * 13 + 5) % n_tokens)))
        times["threshold"].append(timed(lambda: setattr(app.threshold_box, "value", 0.05 + 0.01 * (r + 1))))
        times["factor"].append(timed(lambda: setattr(app.factor_slider, "value", float(r % 4 + 1))))
        assert "mlsae-error" not in app.message.value, app.message.value
    return times


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_browser(sae_dir: Path, tokenizer, n_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Time the served app end to end: Voila on a loopback port, headless Debian chromium."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {**os.environ, "MLSAE_EXPLORER_SAE": str(sae_dir), "MLSAE_EXPLORER_EXAMPLES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "voila", str(ROOT / "notebooks" / "explorer.ipynb"), "--no-browser",
                             "--Voila.ip=127.0.0.1", f"--port={port}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    times: dict[str, list[float]] = {"submit": [], "layer": [], "position": [], "factor": []}
    try:
        with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
            browser = pw.chromium.launch_persistent_context(
                profile, executable_path="/usr/bin/chromium", headless=True, viewport={"width": 1280, "height": 2400},
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
                ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")) else route.abort())
            deadline = time.monotonic() + 120
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}/", timeout=300_000)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            page.wait_for_selector(".mlsae-prompt textarea", timeout=300_000)
            layers = sae_layers(sae_dir)
            for r in range(-1, repeats):  # r = -1 warms up
                page.fill(".mlsae-prompt textarea", prompt_of(tokenizer, n_tokens, salt=1000 + r))
                t = timed(lambda: (page.click(".mlsae-submit"), page.wait_for_function(
                    f"(document.querySelector('.mlsae-message') || {{}}).innerText?.includes('{n_tokens} tokens in')"
                    f" && document.querySelectorAll('.mlsae-heatmap-fig .js-plotly-plot').length == 1", timeout=60_000)))
                if r < 0:
                    continue
                times["submit"].append(t)
                layer = layers[(r * 7 + 3) % len(layers)]
                times["layer"].append(_change(page, ".mlsae-layer input", layer,
                                              f"layer {layer} → SAE reconstruction", ".mlsae-logits"))
                position = (r * 13 + 5) % n_tokens
                times["position"].append(_change(page, ".mlsae-position input", position,
                                                 f"at position {position} (", ".mlsae-position-fig"))
                factor = float(r % 4 + 1)
                times["factor"].append(_change(page, None, factor, f"×{factor:g} at layer", ".mlsae-logits"))
            browser.close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
    return times


def sae_layers(sae_dir: Path) -> list[int]:
    config = json.loads((sae_dir / "config.json").read_text())
    return config.get("layers") or list(range(config["n_layers"]))


def _change(page, selector: str | None, value, expect: str, where: str) -> float:
    """Seconds from entering a control value until ``expect`` shows in ``where``."""
    def act():
        if selector is None:  # the steering slider: set through its model-backed readout
            page.fill(".widget-readout", str(value)) if page.locator(".widget-readout").count() else None
            page.press(".widget-readout", "Enter")
        else:
            page.fill(selector, str(value))
            page.press(selector, "Enter")
        js = f"document.querySelector({json.dumps(where)}).innerText.includes({json.dumps(expect)})"
        page.wait_for_function(js, timeout=60_000)
    return timed(act)


def summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"median_s": round(statistics.median(v), 3), "max_s": round(max(v), 3), "n": len(v)}
            for k, v in times.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", default=None, help="a trained MLSAE (default: a random one of the model's shape)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--n-latents", type=int, default=4608)
    parser.add_argument("-k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--browser", action="store_true", help="also time the Voila app in headless chromium")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="of the in-process forwards")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        if args.sae:
            from mlsae.explorer import load_explorer

            ex = load_explorer(args.sae)
            sae, tf, sae_dir = ex.sae, ex.transformer, Path(args.sae)
        else:
            sae_dir = Path(tmp) / "sae"
            sae, tf = random_sae(args.model, args.n_latents, args.k, sae_dir)
        print(f"model {tf.name}: {tf.n_layers} layers, d={tf.d_model}; MLSAE {sae.config.n_latents} latents, "
              f"k={sae.config.k}; {args.tokens}-token prompts; {args.precision}; torch threads {torch.get_num_threads()}; "
              f"load average {os.getloadavg()[0]:.1f}")
        results = {"in_process": summary(in_process(sae, tf, args.tokens, args.repeats, args.precision))}
        results["load_average_after"] = round(os.getloadavg()[0], 1)
        if args.browser:
            results["browser"] = summary(in_browser(sae_dir, tf.tokenizer, args.tokens, args.repeats))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
