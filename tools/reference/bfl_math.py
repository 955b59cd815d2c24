"""Independent float32 implementation of the FLUX.1 flow model and autoencoder, written from
docs/flux.md (§2.1, §2.2 and §3) and using the BFL / LDM state-dict
key names. It is NOT a copy of the BFL reference code.

make_fixtures.py uses these modules to (a) define the key layout and shapes of the tiny BFL-layout
checkpoints and (b) cross-check the goldens, which are computed with diffusers' modules.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------
# Flow model (BFL keys)
# --------------------------------------------------------------------------------------

def timestep_embedding(t, dim=256, max_period=10000.0, time_factor=1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first


def rope_angles(ids, axes_dim, theta):
    """ids [B, L, n_axes] -> (cos, sin) each [B, 1, L, head_dim/2] in pair order."""
    cos, sin = [], []
    for i, d in enumerate(axes_dim):
        k = torch.arange(0, d, 2, dtype=torch.float32) / d
        omega = 1.0 / (theta ** k)
        ang = ids[..., i].float()[..., None] * omega  # [B, L, d/2]
        cos.append(torch.cos(ang))
        sin.append(torch.sin(ang))
    return torch.cat(cos, -1)[:, None], torch.cat(sin, -1)[:, None]


def apply_rope(x, cos, sin):
    """x [B, nh, L, d]; pairs are interleaved (2p, 2p+1)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    o0 = cos * x0 - sin * x1
    o1 = sin * x0 + cos * x1
    return torch.stack([o0, o1], dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class MLPEmbedder(nn.Module):
    def __init__(self, din, h):
        super().__init__()
        self.in_layer = nn.Linear(din, h)
        self.out_layer = nn.Linear(h, h)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    def __init__(self, h, k):
        super().__init__()
        self.k = k
        self.lin = nn.Linear(h, k * h)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.k, dim=-1)  # shift, scale, gate, ...


class SelfAttention(nn.Module):
    def __init__(self, h, nh, qkv_bias):
        super().__init__()
        self.qkv = nn.Linear(h, 3 * h, bias=qkv_bias)
        self.norm = QKNorm(h // nh)
        self.proj = nn.Linear(h, h)


def ln(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def split_qkv(qkv, nh):
    b, l, three_h = qkv.shape
    d = three_h // 3 // nh
    qkv = qkv.view(b, l, 3, nh, d).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def attention(q, k, v, cos, sin):
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    x = F.scaled_dot_product_attention(q, k, v)
    b, nh, l, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, l, nh * d)


class DoubleBlock(nn.Module):
    def __init__(self, h, nh, mlp_ratio, qkv_bias):
        super().__init__()
        self.nh = nh
        m = int(h * mlp_ratio)
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(h, 6))
            setattr(self, f"{s}_attn", SelfAttention(h, nh, qkv_bias))
            setattr(self, f"{s}_mlp", nn.Sequential(nn.Linear(h, m), nn.GELU(approximate="tanh"), nn.Linear(m, h)))

    def forward(self, img, txt, vec, cos, sin):
        qs, ks, vs, mods = [], [], [], {}
        for s, x in (("txt", txt), ("img", img)):
            mod = getattr(self, f"{s}_mod")(vec)
            mods[s] = mod
            shift1, scale1 = mod[0], mod[1]
            attn = getattr(self, f"{s}_attn")
            q, k, v = split_qkv(attn.qkv((1 + scale1) * ln(x) + shift1), self.nh)
            q, k = attn.norm.query_norm(q), attn.norm.key_norm(k)
            qs.append(q), ks.append(k), vs.append(v)
        a = attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2), cos, sin)
        lt = txt.shape[1]
        out = {}
        for s, x, a_s in (("txt", txt, a[:, :lt]), ("img", img, a[:, lt:])):
            shift1, scale1, gate1, shift2, scale2, gate2 = mods[s]
            x = x + gate1 * getattr(self, f"{s}_attn").proj(a_s)
            x = x + gate2 * getattr(self, f"{s}_mlp")((1 + scale2) * ln(x) + shift2)
            out[s] = x
        return out["img"], out["txt"]


class SingleBlock(nn.Module):
    def __init__(self, h, nh, mlp_ratio):
        super().__init__()
        self.h, self.nh, self.m = h, nh, int(h * mlp_ratio)
        self.linear1 = nn.Linear(h, 3 * h + self.m)
        self.linear2 = nn.Linear(h + self.m, h)
        self.norm = QKNorm(h // nh)
        self.modulation = Modulation(h, 3)

    def forward(self, x, vec, cos, sin):
        shift, scale, gate = self.modulation(vec)
        qkv, u = torch.split(self.linear1((1 + scale) * ln(x) + shift), [3 * self.h, self.m], dim=-1)
        q, k, v = split_qkv(qkv, self.nh)
        q, k = self.norm.query_norm(q), self.norm.key_norm(k)
        a = attention(q, k, v, cos, sin)
        return x + gate * self.linear2(torch.cat([a, F.gelu(u, approximate="tanh")], -1))


class LastLayer(nn.Module):
    def __init__(self, h, out):
        super().__init__()
        self.linear = nn.Linear(h, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # shift first
        return self.linear((1 + scale) * ln(x) + shift)


class Flux(nn.Module):
    def __init__(self, in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                 mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56),
                 theta=10000, qkv_bias=True, guidance_embed=True):
        super().__init__()
        assert sum(axes_dim) == hidden_size // num_heads
        self.axes_dim, self.theta = list(axes_dim), theta
        h = hidden_size
        self.img_in = nn.Linear(in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(vec_in_dim, h)
        self.guidance_embed = guidance_embed
        if guidance_embed:
            self.guidance_in = MLPEmbedder(256, h)
        self.txt_in = nn.Linear(context_in_dim, h)
        self.double_blocks = nn.ModuleList([DoubleBlock(h, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleBlock(h, num_heads, mlp_ratio) for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(h, 64)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        img = self.img_in(img)
        txt = self.txt_in(txt)
        vec = self.time_in(timestep_embedding(timesteps)) + self.vector_in(y)
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("guidance required for a guidance-distilled model")
            vec = vec + self.guidance_in(timestep_embedding(guidance))
        cos, sin = rope_angles(torch.cat([txt_ids, img_ids], 1), self.axes_dim, self.theta)
        for blk in self.double_blocks:
            img, txt = blk(img, txt, vec, cos, sin)
        x = torch.cat([txt, img], 1)
        for blk in self.single_blocks:
            x = blk(x, vec, cos, sin)
        return self.final_layer(x[:, txt.shape[1]:], vec)


# --------------------------------------------------------------------------------------
# Autoencoder (LDM keys)
# --------------------------------------------------------------------------------------

def gn(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = gn(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = gn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = gn(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # [B,1,N,C]
        a = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, in_channels=3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            lvl = nn.Module()
            cin, cout = ch * in_mult[i], ch * mult
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(cin, cout))
                cin = cout
            lvl.block = nn.ModuleList(blocks)
            lvl.attn = nn.ModuleList()
            if i != len(ch_mult) - 1:
                lvl.downsample = Downsample(cout)
            self.down.append(lvl)
        c = ch * ch_mult[-1]
        self.mid = Mid(c)
        self.norm_out = gn(c)
        self.conv_out = nn.Conv2d(c, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for b in lvl.block:
                h = b(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, out_ch=3):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = Mid(c)
        ups = []
        for i in reversed(range(len(ch_mult))):
            lvl = nn.Module()
            cout = ch * ch_mult[i]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, cout))
                c = cout
            lvl.block = nn.ModuleList(blocks)
            lvl.attn = nn.ModuleList()
            if i != 0:
                lvl.upsample = Upsample(c)
            ups.insert(0, lvl)
        self.up = nn.ModuleList(ups)
        self.norm_out = gn(c)
        self.conv_out = nn.Conv2d(c, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for lvl in reversed(self.up):
            for b in lvl.block:
                h = b(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16,
                 scale_factor=0.3611, shift_factor=0.1159):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.scale_factor, self.shift_factor = scale_factor, shift_factor
        self.z_channels = z_channels

    def encode(self, x):
        mean = self.encoder(x)[:, : self.z_channels]
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, z):
        return self.decoder(z / self.scale_factor + self.shift_factor)


# --------------------------------------------------------------------------------------
# Sampling helpers (docs/flux.md §3)
# --------------------------------------------------------------------------------------

def get_lin_function(x1=256.0, y1=0.5, x2=4096.0, y2=1.15):
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def time_shift(mu, sigma, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_schedule(num_steps, image_seq_len, base_shift=0.5, max_shift=1.15, shift=True):
    timesteps = torch.linspace(1, 0, num_steps + 1)  # float32
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def pack(x):
    """b c (h 2) (w 2) -> b (h w) (c 2 2)"""
    b, c, hh, ww = x.shape
    x = x.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (hh // 2) * (ww // 2), c * 4)


def unpack(x, height, width):
    """inverse of pack; height/width in pixels."""
    h, w = math.ceil(height / 16), math.ceil(width / 16)
    b, l, d = x.shape
    c = d // 4
    x = x.view(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, 2 * h, 2 * w)


def img_ids_grid(h, w, bs=1):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(1, h * w, 3).repeat(bs, 1, 1)
