"""Issue 5: a user-written nn.Module from standard layers trains one SGD step ballified, with midpoint identity."""

import copy

import torch
from torch import nn

import ballgrad as bg
from helpers import assert_same_bits


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.conv2d = nn.Conv2d(1, 2, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(2)
        self.lin = nn.Linear(8 + 2 * 6 * 8, 16)
        self.gelu, self.silu = nn.GELU(), nn.SiLU()
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        e = self.embed(tokens)                                  # (N, L, 8)
        c = self.bn1d(self.conv1d(e.transpose(1, 2))).transpose(1, 2)
        a, _ = self.attn(c, c, c)
        h = self.norm(a + c)                                    # (N, L, 8)
        img = self.bn2d(self.conv2d(h.unsqueeze(1)[:, :, :6, :]))  # (N, 2, 6, 8)
        z = torch.cat([h.mean(1), img.flatten(1)], dim=1)
        z = self.drop(self.silu(self.gelu(self.lin(z))))
        return self.head(z)


def test_user_module_trains_one_sgd_step_ballified():
    torch.manual_seed(0)
    plain = Mixed()
    model = bg.ballify(copy.deepcopy(plain))
    tokens = torch.randint(0, 20, (4, 7))
    target = torch.randint(0, 3, (4,))
    results = []
    for m in (plain, model):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(123)  # the same dropout mask in both runs
        loss = nn.functional.cross_entropy(m(tokens), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        results.append((loss, dict(m.named_parameters())))
    (plain_loss, plain_params), (ball_loss, ball_params) = results
    assert isinstance(ball_loss, bg.BallTensor)
    assert_same_bits(ball_loss.mid, plain_loss.detach())
    for name, p in ball_params.items():
        assert isinstance(p, bg.BallTensor) and isinstance(p.grad, bg.BallTensor), name
        assert_same_bits(p.grad.mid, plain_params[name].grad)
        assert_same_bits(p.mid, plain_params[name].detach())
        assert not bool(torch.isnan(p.rad).any())
