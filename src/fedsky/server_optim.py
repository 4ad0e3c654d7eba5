"""Server optimizers for pseudo-gradient aggregation: torch.optim, plus Yogi, which torch lacks.

FedAdam / FedYogi / FedAdagrad follow Reddi et al. 2021 ("Adaptive Federated Optimization"),
with `tau` as the adaptivity (the eps in the denominator).
"""

from __future__ import annotations

import torch

from fedsky.config import FedOptConfig


class Yogi(torch.optim.Optimizer):
    """Yogi (Zaheer et al. 2018), as in FedYogi: v <- v - (1 - b2) g^2 sign(v - g^2).

    Written here because torch.optim has no Yogi; it is Adam with an additive, sign-controlled
    second-moment update, so v grows slowly and never explodes the step.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, group["eps"] ** 2)  # v_0 = tau^2 (Reddi)
                m, v = state["m"], state["v"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                g2 = g * g
                v.addcmul_(torch.sign(v - g2), g2, value=-(1 - b2))
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])
        return None


def make_server_optimizer(params: list[torch.nn.Parameter], cfg: FedOptConfig
                          ) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.tau)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.tau,
                                   initial_accumulator_value=cfg.tau**2)
    return Yogi(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.tau)
