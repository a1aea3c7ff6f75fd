"""`chatfoundry rl play`: a saved agent plays episodes; each is written as a GIF (rgb_array frames).

Rendering needs pygame (`pip install 'chatfoundry[rl-render]'`); `gif=False` only plays and
reports the returns.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from chatfoundry.errors import UserError
from chatfoundry.rl.common import make_env
from chatfoundry.rl.train import load_act


def play(ckpt: str | Path, episodes: int = 3, seed: int = 0, out: str | Path | None = None, gif: bool = True,
         deterministic: bool = True, fps: int = 30, log: Callable[[str], None] = print) -> dict[str, Any]:
    if episodes <= 0:
        raise UserError("--episodes: must be > 0")
    if fps <= 0:
        raise UserError("--fps: must be > 0")
    meta, act = load_act(ckpt, deterministic)
    if gif and importlib.util.find_spec("pygame") is None:  # gymnasium draws rgb_array frames with it
        raise UserError("rendering needs pygame: pip install 'chatfoundry[rl-render]' "
                        "(or pass --no_gif to only print the returns)")
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # frames are drawn off-screen: no display needed
    folder = Path(out) if out else Path(ckpt) / "play"
    env = make_env(meta["env"], meta["env_kwargs"], render_mode="rgb_array" if gif else None)
    returns, files = [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        frames, total, steps, done = [env.render()] if gif else [], 0.0, 0, False
        while not done:
            obs, reward, term, trunc, _ = env.step(act(np.asarray([obs]))[0])
            total, steps, done = total + float(reward), steps + 1, term or trunc
            if gif:
                frames.append(env.render())
        returns.append(total)
        line = f"episode {i + 1}: return {total:.2f} in {steps} steps"
        if gif:
            folder.mkdir(parents=True, exist_ok=True)
            files.append(str(_write_gif(frames, folder / f"episode{i + 1}.gif", fps)))
            line += f" -> {files[-1]}"
        log(line)
    env.close()
    log(f"{meta['algo']} on {meta['env']}: mean return {np.mean(returns):.2f} over {episodes} episodes")
    return {"algo": meta["algo"], "env": meta["env"], "returns": returns, "mean_return": float(np.mean(returns)),
            "gifs": files}


def _write_gif(frames: list[np.ndarray], path: Path, fps: int) -> Path:
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path
