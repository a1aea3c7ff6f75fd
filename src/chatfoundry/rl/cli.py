"""The `chatfoundry rl` command group: train, compare, play. Thin wiring into the rl modules."""

from __future__ import annotations

from chatfoundry.config import ArgumentParser, add_config_args


def add_rl_parser(sub) -> None:
    from chatfoundry.rl.train import ALGOS, RLConfig

    p = sub.add_parser("rl", help="classic RL on Gymnasium: Q-learning, DQN, REINFORCE, TRPO, PPO, PPO-KL",
                       description="Train, compare and watch the classic RL algorithms on Gymnasium environments.")
    rsub = p.add_subparsers(dest="action", required=True, parser_class=ArgumentParser)

    t = rsub.add_parser("train", help="train one agent; saves it, evaluates it, plots its curves",
                        description=f"Train --algo ({', '.join(ALGOS)}) on --env for --steps environment steps. "
                                    "Hyperparameters: the algorithm's defaults, refined by a preset for known "
                                    "environments (CartPole, Acrobot, Pendulum, FrozenLake, Taxi, CliffWalking), "
                                    "then --config YAML, then --SECTION.FIELD flags (e.g. --ppo.lr 3e-4).")
    add_config_args(t, RLConfig)
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last line")
    t.set_defaults(func=_train)

    c = rsub.add_parser("compare", help="several algorithms x seeds on one env: mean and spread learning curves",
                        description="Train each of --algos for --seeds seeds on --env (each run as `rl train` "
                                    "does it, in OUT/ALGO/seedK) and draw training return against environment "
                                    "steps and against wall time on one figure (OUT/compare.png).")
    c.add_argument("--env", default="CartPole-v1")
    c.add_argument("--algos", default="ppo,trpo,reinforce,dqn", help=f"comma-separated, from {', '.join(ALGOS)}")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per algorithm")
    c.add_argument("--steps", type=int, default=100_000, help="environment steps per run")
    c.add_argument("--out", default="runs/rl-compare")
    c.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config field for every run, e.g. --set eval_episodes=20 (repeatable)")
    c.add_argument("--overwrite", action="store_true", help="replace a comparison already in --out")
    c.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last line")
    c.set_defaults(func=_compare)

    g = rsub.add_parser("play", help="a saved agent plays episodes, rendered to GIFs; prints the returns")
    g.add_argument("--ckpt", required=True, help="a run folder of `rl train` (agent.json + model.safetensors)")
    g.add_argument("--episodes", type=int, default=3)
    g.add_argument("--seed", type=int, default=0, help="reset seed of the first episode (then +1 each)")
    g.add_argument("--out", default=None, help="folder for episodeN.gif (default: CKPT/play)")
    g.add_argument("--fps", type=int, default=30)
    g.add_argument("--no_gif", action="store_true", help="only play and print the returns (no pygame needed)")
    g.add_argument("--stochastic", action="store_true", help="sample actions instead of the greedy / mean action")
    g.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last line")
    g.set_defaults(func=_play)


def _train(args) -> dict:
    from chatfoundry.rl.train import resolve, run

    return run(resolve(args), overwrite=args.overwrite)


def _compare(args) -> dict:
    from chatfoundry.errors import UserError
    from chatfoundry.rl.compare import compare, parse_algos

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set: expected FIELD=VALUE, got {item!r}")
        overrides[key] = value
    return compare(args.env, parse_algos(args.algos), args.seeds, args.steps, args.out, args.overwrite, overrides)


def _play(args) -> dict:
    from chatfoundry.rl.play import play

    return play(args.ckpt, args.episodes, args.seed, args.out, gif=not args.no_gif,
                deterministic=not args.stochastic, fps=args.fps)
