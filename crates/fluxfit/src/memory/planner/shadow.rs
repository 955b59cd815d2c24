//! Shadows of the networks and of the text-to-image pipeline over [`Sim`]: each function mirrors
//! the one named in its doc comment (same ops, same order, same drops).

use candle_core::DType;

use super::sim::{PhaseStat, ShadowWeights, Sim, T};
use crate::model::autoencoder::{tile_starts, vae_tile_overlap, AutoEncoderConfig};
use crate::model::clip::ClipConfig;
use crate::model::flow::FlowConfig;
use crate::model::t5::T5Config;

const F32: DType = DType::F32;

/// `attention::rope_angles`: (cos, sin), each `[L, head_dim/2]` f32 on the device. On a GPU the
/// angles are computed on the host and copied over.
fn rope_angles(s: &Sim, l: usize, axes: &[usize]) -> (T, T) {
    let half: usize = axes.iter().sum::<usize>() / 2;
    if s.cfg.host_is_device {
        let parts: Vec<T> = axes.iter().map(|a| s.ew(l * a / 2, F32)).collect();
        let angles = s.ew(l * half, F32);
        let cos = s.ew(l * half, F32);
        let sin = s.ew(l * half, F32);
        drop(angles);
        drop(parts);
        (cos, sin)
    } else {
        (s.act(l * half, F32), s.act(l * half, F32))
    }
}

/// `model::flow::Flux::forward` for batch 1.
#[allow(clippy::too_many_arguments)]
pub(crate) fn flow_forward(
    s: &Sim,
    w: &ShadowWeights,
    cfg: &FlowConfig,
    chunk: Option<usize>,
    img: &T,
    li: usize,
    txt: &T,
    lt: usize,
) -> T {
    let dt = w.dtype;
    let h = cfg.hidden_size;
    let l = li + lt;
    let emb = w.stage(s, "embed");
    let img_e = {
        let x = s.cast(img, dt);
        let o = s.linear(&x, li, cfg.in_channels, h, true);
        drop(x);
        o
    };
    let txt_e = {
        let x = s.cast(txt, dt);
        let o = s.linear(&x, lt, cfg.context_in_dim, h, true);
        drop(x);
        o
    };
    drop(emb);
    let ids = s.ew(l * 3, F32);
    let pe = rope_angles(s, l, &cfg.axes_dim);
    let net = FlowNet { s, cfg, chunk, dt };
    let (mut im, mut tx) = (img_e, txt_e);
    for i in 0..cfg.depth {
        let b = w.stage(s, &format!("double_blocks.{i}"));
        let (a, c) = net.double_block(&im, li, &tx, lt);
        im = a;
        tx = c;
        drop(b);
    }
    let mut x = s.ew(l * h, dt);
    for i in 0..cfg.depth_single {
        let b = w.stage(s, &format!("single_blocks.{i}"));
        x = net.single_block(&x, l);
        drop(b);
    }
    let x = x.part(li * h, true);
    let f = w.stage(s, "final_layer");
    let out = {
        let ln = s.layer_norm_plain(&x);
        let md = s.modulate(&ln);
        let o = s.linear(&md, li, h, cfg.out_channels, true);
        drop(md);
        drop(ln);
        o
    };
    drop(f);
    drop(x);
    drop(pe);
    drop(ids);
    drop(tx);
    drop(im);
    out
}

struct FlowNet<'a> {
    s: &'a Sim,
    cfg: &'a FlowConfig,
    chunk: Option<usize>,
    dt: DType,
}

impl FlowNet<'_> {
    /// `Flux::qkv`: projection, head split (views of the projection), QK-norm.
    fn qkv(&self, x: &T, l: usize) -> (T, T, T) {
        let s = self.s;
        let h = self.cfg.hidden_size;
        let qkv = s.linear(x, l, h, 3 * h, self.cfg.qkv_bias);
        let v = qkv.part(l * h, false);
        let (q, k) = self.qk_norm(&qkv.part(l * h, false), &qkv.part(l * h, false));
        (q, k, v)
    }

    fn qk_norm(&self, q: &T, k: &T) -> (T, T) {
        let q = self.s.rms_norm(q);
        let k = self.s.rms_norm(k);
        (q, k)
    }

    /// `Flux::attend`: RoPE on q and k, attention, heads merged (a copy).
    fn attend(&self, q: &T, k: &T, v: &T, l: usize) -> T {
        let s = self.s;
        let h = self.cfg.hidden_size;
        let qr = s.rope(q);
        let kr = s.rope(k);
        let a = s.attention(
            &qr,
            &kr,
            v,
            self.cfg.num_heads,
            l,
            l,
            self.cfg.head_dim(),
            self.chunk,
            false,
        );
        let out = s.ew(l * h, self.dt);
        drop(a);
        drop(kr);
        drop(qr);
        out
    }

    /// `Flux::double_block`.
    fn double_block(&self, img: &T, li: usize, txt: &T, lt: usize) -> (T, T) {
        let s = self.s;
        let (h, dt) = (self.cfg.hidden_size, self.dt);
        let l = li + lt;
        let stream_in = |x: &T, n: usize| {
            let ln = s.layer_norm_plain(x);
            let md = s.modulate(&ln);
            let r = self.qkv(&md, n);
            drop(md);
            drop(ln);
            r
        };
        let (iq, ik, iv) = stream_in(img, li);
        let (tq, tk, tv) = stream_in(txt, lt);
        let q = s.ew(l * h, dt);
        drop((tq, iq));
        let k = s.ew(l * h, dt);
        drop((tk, ik));
        let v = s.ew(l * h, dt);
        drop((tv, iv));
        let a = self.attend(&q, &k, &v, l);
        let img_out = self.stream(img, li, &a.part(li * h, true));
        let txt_out = self.stream(txt, lt, &a.part(lt * h, true));
        drop(a);
        drop(v);
        drop(k);
        drop(q);
        (img_out, txt_out)
    }

    /// The `stream` closure of `Flux::double_block` (the residual input `_x` only sets sizes).
    fn stream(&self, _x: &T, l: usize, attn: &T) -> T {
        let s = self.s;
        let (h, m, dt) = (self.cfg.hidden_size, self.cfg.mlp_hidden, self.dt);
        let x2 = {
            let p = s.linear(attn, l, h, h, true);
            let g = s.ew(l * h, dt);
            let x2 = s.ew(l * h, dt);
            drop(g);
            drop(p);
            x2
        };
        let hm = {
            let ln = s.layer_norm_plain(&x2);
            let md = s.modulate(&ln);
            drop(ln);
            md
        };
        let h1 = s.linear(&hm, l, h, m, true);
        let h2 = {
            let g = s.ew(l * m, dt);
            let o = s.linear(&g, l, m, h, true);
            drop(g);
            o
        };
        let out = {
            let g = s.ew(l * h, dt);
            let o = s.ew(l * h, dt);
            drop(g);
            o
        };
        drop(h2);
        drop(h1);
        drop(hm);
        drop(x2);
        out
    }

    /// `Flux::single_block`.
    fn single_block(&self, x: &T, l: usize) -> T {
        let s = self.s;
        let (h, m, dt) = (self.cfg.hidden_size, self.cfg.mlp_hidden, self.dt);
        let xm = {
            let ln = s.layer_norm_plain(x);
            let md = s.modulate(&ln);
            drop(ln);
            md
        };
        let lin1 = s.linear(&xm, l, h, 3 * h + m, true);
        let mlp = lin1.part(l * m, false);
        // `split_heads` reshapes a strided narrow of lin1: a copy of the q, k, v columns.
        let cp = s.ew(l * 3 * h, dt);
        let (q, k, v) = (
            cp.part(l * h, false),
            cp.part(l * h, false),
            cp.part(l * h, false),
        );
        drop(cp);
        let (q2, k2) = self.qk_norm(&q, &k);
        let a = self.attend(&q2, &k2, &v, l);
        let out = {
            let g = s.ew(l * m, dt);
            let c = s.ew(l * (h + m), dt);
            let o = s.linear(&c, l, h + m, h, true);
            drop(c);
            drop(g);
            drop(a);
            o
        };
        let res = {
            let g = s.ew(l * h, dt);
            let r = s.ew(l * h, dt);
            drop(g);
            r
        };
        drop(out);
        drop((q2, k2, q, k, v, mlp, lin1, xm));
        res
    }
}

/// The autoencoder's shadow (`model::autoencoder`).
pub(crate) struct Vae<'a> {
    pub s: &'a Sim,
    pub cfg: &'a AutoEncoderConfig,
    pub chunk: Option<usize>,
    pub dt: DType,
}

impl Vae<'_> {
    fn group_norm(&self, x: &T, c: usize, hw: usize) -> T {
        let s = self.s;
        let n = c * hw;
        let xf = s.cast(x, F32);
        let centred = s.ew(n, F32);
        drop(s.ew(n, F32));
        let y = s.ew(n, F32);
        let y2 = s.cast(&y, self.dt);
        let m = s.ew(n, self.dt);
        let o = s.ew(n, self.dt);
        drop(m);
        drop((y2, y, centred, xf));
        o
    }

    fn gn_swish_conv(&self, x: &T, cin: usize, cout: usize, hw: usize) -> T {
        let s = self.s;
        let g = self.group_norm(x, cin, hw);
        let sw = s.ew(cin * hw, self.dt);
        let c = s.conv(&sw, cin, cout, 3, hw, hw, true);
        drop(sw);
        drop(g);
        c
    }

    /// `autoencoder::resnet`.
    fn resnet(&self, x: &T, cin: usize, cout: usize, hw: usize) -> T {
        let s = self.s;
        let h1 = self.gn_swish_conv(x, cin, cout, hw);
        let h2 = self.gn_swish_conv(&h1, cout, cout, hw);
        let skip = if cin != cout {
            s.conv(x, cin, cout, 1, hw, hw, true)
        } else {
            x.clone()
        };
        let out = s.ew(cout * hw, self.dt);
        drop((skip, h2, h1));
        out
    }

    /// `AutoEncoder::attn`.
    fn attn(&self, x: &T, c: usize, hw: usize) -> T {
        let s = self.s;
        let n = self.group_norm(x, c, hw);
        let a = {
            let q = s.conv(&n, c, c, 1, hw, hw, true).nc();
            let k = s.conv(&n, c, c, 1, hw, hw, true).nc();
            let v = s.conv(&n, c, c, 1, hw, hw, true).nc();
            let a = s.attention(&q, &k, &v, 1, hw, hw, c, self.chunk, true);
            drop((v, k, q));
            a
        };
        let a2 = s.ew(c * hw, self.dt);
        let out = {
            let p = s.conv(&a2, c, c, 1, hw, hw, true);
            let o = s.ew(c * hw, self.dt);
            drop(p);
            o
        };
        drop((a2, a, n));
        out
    }

    /// `AutoEncoder::mid`.
    fn mid(&self, x: &T, c: usize, hw: usize) -> T {
        let h1 = self.resnet(x, c, c, hw);
        let h2 = self.attn(&h1, c, hw);
        let h3 = self.resnet(&h2, c, c, hw);
        drop((h2, h1));
        h3
    }

    fn top(&self) -> usize {
        self.cfg.ch * self.cfg.ch_mult.last().copied().unwrap_or(1)
    }

    /// `AutoEncoder::decode` of a `[16, lh, lw]` f32 latent.
    pub fn decode(&self, w: &ShadowWeights, z: &T, lh: usize, lw: usize) -> T {
        let (s, cfg, dt) = (self.s, self.cfg, self.dt);
        let zc = cfg.z_channels;
        let z2 = {
            let a = s.cast(z, dt);
            let b = s.ew(z.n, dt);
            let c = s.ew(z.n, dt);
            drop(b);
            drop(a);
            c
        };
        let top = self.top();
        let mut hw = lh * lw;
        let mut h = {
            let st = w.stage(s, "decoder.conv_in");
            let o = s.conv(&z2, zc, top, 3, hw, hw, true);
            drop(st);
            o
        };
        h = {
            let st = w.stage(s, "decoder.mid");
            let o = self.mid(&h, top, hw);
            drop(st);
            o
        };
        let mut c = top;
        for i in (0..cfg.ch_mult.len()).rev() {
            let st = w.stage(s, &format!("decoder.up.{i}"));
            let cout = cfg.ch * cfg.ch_mult[i];
            for _ in 0..=cfg.num_res_blocks {
                h = self.resnet(&h, c, cout, hw);
                c = cout;
            }
            if i != 0 {
                h = {
                    let up = s.ew(c * hw * 4, dt);
                    let o = s.conv(&up, c, c, 3, hw * 4, hw * 4, true);
                    drop(up);
                    o
                };
                hw *= 4;
            }
            drop(st);
        }
        let st = w.stage(s, "decoder.out");
        h = {
            let g = self.group_norm(&h, c, hw);
            let sw = s.ew(c * hw, dt);
            drop(g);
            sw
        };
        let out = s.conv(&h, c, cfg.out_ch, 3, hw, hw, true);
        drop((st, h, z2));
        out
    }

    /// `AutoEncoder::encode` of a `[3, height, width]` image: the scaled latent mean.
    pub fn encode(&self, w: &ShadowWeights, x: &T, height: usize, width: usize) -> T {
        let (s, cfg, dt) = (self.s, self.cfg, self.dt);
        let (mut hh, mut ww) = (height, width);
        let first = w.stage(s, "encoder.conv_in");
        let mut h = {
            let xc = s.cast(x, dt);
            let o = s.conv(&xc, cfg.in_channels, cfg.ch, 3, hh * ww, hh * ww, true);
            drop(xc);
            o
        };
        let mut c = cfg.ch;
        let levels = cfg.ch_mult.len();
        for i in 0..levels {
            let st = w.stage(s, &format!("encoder.down.{i}"));
            let cout = cfg.ch * cfg.ch_mult[i];
            for _ in 0..cfg.num_res_blocks {
                h = self.resnet(&h, c, cout, hh * ww);
                c = cout;
            }
            if i + 1 != levels {
                h = {
                    let p1 = s.ew(c * hh * (ww + 1), dt);
                    let p2 = s.ew(c * (hh + 1) * (ww + 1), dt);
                    drop(p1);
                    p2
                };
                let (oh, ow) = (hh / 2, ww / 2);
                h = s.conv(&h, c, c, 3, (hh + 1) * (ww + 1), oh * ow, false);
                (hh, ww) = (oh, ow);
            }
            drop(st);
        }
        let hw = hh * ww;
        h = {
            let st = w.stage(s, "encoder.mid");
            let o = self.mid(&h, c, hw);
            drop(st);
            o
        };
        let st = w.stage(s, "encoder.out");
        h = {
            let g = self.group_norm(&h, c, hw);
            let sw = s.ew(c * hw, dt);
            drop(g);
            sw
        };
        h = s.conv(&h, c, 2 * cfg.z_channels, 3, hw, hw, true);
        let mean = h.part(cfg.z_channels * hw, true);
        let out = {
            let a = s.ew(mean.n, dt);
            let b = s.ew(mean.n, dt);
            drop(a);
            b
        };
        drop((st, mean, h, first));
        out
    }
}

/// `model::t5::T5Encoder::forward` for batch 1: `[L, d_model]`.
pub(crate) fn t5_forward(s: &Sim, w: &ShadowWeights, cfg: &T5Config, l: usize) -> T {
    let dt = w.dtype;
    let (d, inner, ff, nh) = (
        cfg.d_model,
        cfg.num_heads * cfg.d_kv,
        cfg.d_ff,
        cfg.num_heads,
    );
    let emb = w.stage(s, "shared");
    let mut h = s.ew(l * d, dt);
    drop(emb);
    let mut bias: Option<T> = None;
    for i in 0..cfg.num_layers {
        let b = w.stage(s, &format!("encoder.block.{i}"));
        if bias.is_none() {
            let buckets = s.work(l * l * 4);
            let sel = s.ew(l * l * nh, dt);
            let c = s.ew(l * l * nh, dt);
            drop(sel);
            drop(buckets);
            bias = Some(c);
        }
        // `block(s, h, bias)`.
        let ln = |x: &T| -> T {
            let xf = s.cast(x, F32);
            drop(s.ew(x.n, F32));
            let y = s.ew(x.n, F32);
            let out = {
                let c = s.cast(&y, dt);
                let o = s.ew(x.n, dt);
                drop(c);
                o
            };
            drop(y);
            drop(xf);
            out
        };
        let x = ln(&h);
        let h2 = {
            let a = {
                let proj = || {
                    let lin = s.linear(&x, l, d, inner, false);
                    let c = s.ew(l * inner, dt);
                    drop(lin);
                    c
                };
                let (q, k, v) = (proj(), proj(), proj());
                let scores = {
                    let kt = s.ew(l * inner, dt);
                    let mm = s.bmm(nh, l, l, cfg.d_kv, dt);
                    let sb = s.ew(nh * l * l, dt);
                    drop(mm);
                    drop(kt);
                    sb
                };
                let probs = {
                    let s32 = s.cast(&scores, F32);
                    let p32 = s.ew(nh * l * l, F32);
                    let p = s.cast(&p32, dt);
                    drop(p32);
                    drop(s32);
                    p
                };
                let out = {
                    let mo = s.bmm(nh, l, cfg.d_kv, l, dt);
                    let tr = s.ew(l * inner, dt);
                    drop(mo);
                    tr
                };
                let o = s.linear(&out, l, inner, d, false);
                drop((out, probs, scores, v, k, q));
                o
            };
            let r = s.ew(l * d, dt);
            drop(a);
            r
        };
        let x2 = ln(&h2);
        let h3 = {
            let f = {
                let hidden = if cfg.gated {
                    let gate = {
                        let lin = s.linear(&x2, l, d, ff, false);
                        let g = s.ew(l * ff, dt);
                        drop(lin);
                        g
                    };
                    let up = s.linear(&x2, l, d, ff, false);
                    let hd = s.ew(l * ff, dt);
                    drop(up);
                    drop(gate);
                    hd
                } else {
                    let lin = s.linear(&x2, l, d, ff, false);
                    let r = s.ew(l * ff, dt);
                    drop(lin);
                    r
                };
                let o = s.linear(&hidden, l, ff, d, false);
                drop(hidden);
                o
            };
            let r = s.ew(l * d, dt);
            drop(f);
            r
        };
        drop((x2, h2, x));
        h = h3;
        drop(b);
    }
    let norm = w.stage(s, "encoder.final_layer_norm");
    let xf = s.cast(&h, F32);
    drop(s.ew(h.n, F32));
    let y = s.ew(h.n, F32);
    let out = {
        let c = s.cast(&y, dt);
        let o = s.ew(h.n, dt);
        drop(c);
        o
    };
    drop((y, xf, norm, bias, h));
    out
}

/// `model::clip::ClipTextModel::forward` for batch 1: (last hidden `[L, H]`, pooled `[H]`).
pub(crate) fn clip_forward(s: &Sim, w: &ShadowWeights, cfg: &ClipConfig, l: usize) -> (T, T) {
    let dt = w.dtype;
    let (hd, i, nh) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads);
    let mut h = {
        let st = w.stage(s, "embeddings");
        let tok = s.ew(l * hd, dt);
        let o = s.ew(l * hd, dt);
        drop(tok);
        drop(st);
        o
    };
    let mask = s.act(l * l, F32);
    for layer in 0..cfg.num_layers {
        let st = w.stage(s, &format!("encoder.layers.{layer}"));
        let x = s.layer_norm(&h);
        let h2 = {
            let a = {
                let proj = || {
                    let lin = s.linear(&x, l, hd, hd, true);
                    let c = s.ew(l * hd, dt);
                    drop(lin);
                    c
                };
                let (q, k, v) = (proj(), proj(), proj());
                let scores = {
                    let kt = s.ew(l * hd, dt);
                    let mm = s.bmm(nh, l, l, hd / nh, dt);
                    let sc = s.ew(nh * l * l, dt);
                    drop(mm);
                    drop(kt);
                    sc
                };
                // `let scores = scores.to_dtype(F32)?.broadcast_add(mask)?` shadows the first.
                let masked = {
                    let s32 = s.cast(&scores, F32);
                    let m = s.ew(nh * l * l, F32);
                    drop(s32);
                    m
                };
                let probs = {
                    let p32 = s.ew(nh * l * l, F32);
                    let p = s.cast(&p32, dt);
                    drop(p32);
                    p
                };
                let scores = (scores, masked);
                let out = {
                    let mo = s.bmm(nh, l, hd / nh, l, dt);
                    let tr = s.ew(l * hd, dt);
                    drop(mo);
                    tr
                };
                let o = s.linear(&out, l, hd, hd, true);
                drop((out, probs, scores, v, k, q));
                o
            };
            let r = s.ew(l * hd, dt);
            drop(a);
            r
        };
        let x2 = s.layer_norm(&h2);
        let m = {
            let f1 = s.linear(&x2, l, hd, i, true);
            let g = {
                let a = s.ew(l * i, dt);
                let sg = s.ew(l * i, dt);
                let g = s.ew(l * i, dt);
                drop((sg, a));
                g
            };
            let o = s.linear(&g, l, i, hd, true);
            drop((g, f1));
            o
        };
        let h3 = s.ew(l * hd, dt);
        drop((m, x2, h2, x, st));
        h = h3;
    }
    let st = w.stage(s, "final_layer_norm");
    let last = s.layer_norm(&h);
    let pooled = s.ew(hd, dt);
    drop((st, mask, h));
    (last, pooled)
}

/// What the pipeline shadow needs to know about the request.
pub(crate) struct PipelineShape<'a> {
    pub flow: &'a FlowConfig,
    pub ae: &'a AutoEncoderConfig,
    pub t5: &'a T5Config,
    pub clip: &'a ClipConfig,
    pub width: usize,
    pub height: usize,
    pub t5_tokens: usize,
    /// The compute dtype of the pipeline (`LoadOptions::dtype`): latents and embeddings.
    pub dtype: DType,
    pub attn_chunk: Option<usize>,
    /// VAE tile side in pixels (None: the whole image at once).
    pub vae_tile: Option<usize>,
    /// A conditioning image is VAE-encoded in the encode phase (fill, canny, depth, kontext).
    pub image_input: bool,
    /// Its (width, height).
    pub cond_size: (usize, usize),
    /// Extra image tokens the flow model sees (kontext's conditioning image).
    pub extra_img_tokens: usize,
    /// Denoising passes to simulate (2 covers the first pass's loads and the steady state).
    pub passes: usize,
}

/// The weights of the four components under the plan.
pub(crate) struct PipelineWeights {
    pub t5: ShadowWeights,
    pub clip: ShadowWeights,
    pub flow: ShadowWeights,
    pub vae: ShadowWeights,
}

/// `pipeline::text2image` (`Model::text_to_image`): encode, denoise, decode, with the
/// components released at the end of their phases. Returns one [`PhaseStat`] per phase.
pub(crate) fn pipeline(s: &Sim, p: &PipelineShape, w: &PipelineWeights) -> Vec<PhaseStat> {
    let dt = p.dtype;
    let (lat_h, lat_w) = (2 * p.height.div_ceil(16), 2 * p.width.div_ceil(16));
    let li = (lat_h / 2) * (lat_w / 2) + p.extra_img_tokens;
    let lt = p.t5_tokens;
    let zc = p.ae.z_channels;

    s.begin_phase("encode");
    let (txt, vec) = {
        let txt_host = s.on_host(w.t5.on_cpu(), || t5_forward(s, &w.t5, p.t5, lt));
        let pooled = s.on_host(w.clip.on_cpu(), || {
            let (last, pooled) = clip_forward(s, &w.clip, p.clip, 77);
            drop(last);
            pooled
        });
        let bf = |x: &T, host: bool| -> T {
            s.on_host(host, || {
                let a = s.cast(x, DType::BF16);
                let b = s.cast(&a, dt);
                drop(a);
                if s.host_side() {
                    s.act_on_device(b.n, b.dt)
                } else {
                    b
                }
            })
        };
        let txt = bf(&txt_host, w.t5.on_cpu());
        let vec = bf(&pooled, w.clip.on_cpu());
        drop((pooled, txt_host));
        (txt, vec)
    };
    // Image inputs: the conditioning image is encoded too (`prepare_*`).
    let (cw, ch) = p.cond_size;
    let cond = p.image_input.then(|| {
        let vae = Vae {
            s,
            cfg: p.ae,
            chunk: p.attn_chunk,
            dt: w.vae.dtype,
        };
        s.on_host(w.vae.on_cpu(), || {
            let img = s.act(3 * ch * cw, F32);
            let z = match p.vae_tile {
                // `AutoEncoder::encode_tiled`: the latent on the host, then tile by tile the
                // image tile, its encode, the weighted latent tile and its host copy.
                Some(t)
                    if 8 * (t / 8).max(1) < ch.max(cw)
                        && ch.is_multiple_of(8)
                        && cw.is_multiple_of(8) =>
                {
                    let (lh, lw) = (ch / 8, cw / 8);
                    let lt = (t / 8).max(1);
                    let ov = vae_tile_overlap(lt);
                    let n = tile_starts(lh, lt, ov).len() * tile_starts(lw, lt, ov).len();
                    let (th, tw) = (lt.min(lh), lt.min(lw));
                    let full = s.on_host(true, || s.act(zc * lh * lw, F32));
                    for _ in 0..n {
                        let xt = s.ew(3 * 64 * th * tw, F32);
                        let zt = vae.encode(&w.vae, &xt, 8 * th, 8 * tw);
                        drop(xt);
                        let wt = s.act(th * tw, F32);
                        let f = s.cast(&zt, F32);
                        let m = s.ew(zt.n, F32);
                        drop((f, zt));
                        let v = s.on_host(true, || s.act(m.n, F32));
                        drop((v, m, wt));
                    }
                    full
                }
                _ => vae.encode(&w.vae, &img, ch, cw),
            };
            drop(img);
            let packed = s.ew(z.n, dt);
            drop(z);
            if s.host_side() {
                s.act_on_device(packed.n, dt)
            } else {
                packed
            }
        })
    });
    w.t5.release();
    w.clip.release();
    w.vae.release();
    s.end_phase();

    s.begin_phase("denoise");
    let x = {
        let noise = {
            // Drawn on the host and copied over (the host vector is a few MiB: not counted).
            let d = s.act(zc * lat_h * lat_w, F32);
            let c = s.cast(&d, dt);
            drop(d);
            c
        };
        let img = s.ew(noise.n, dt);
        let img_ids = s.act(li * 3, F32);
        let txt_ids = s.act(lt * 3, F32);
        let mut x = img;
        for _ in 0..p.passes {
            let v = s.on_host(w.flow.on_cpu(), || {
                let input = match &cond {
                    // The conditioning joins the noisy latent (fill, control: channels; kontext:
                    // tokens).
                    Some(_) => s.ew(li * p.flow.in_channels, dt),
                    None => x.clone(),
                };
                let v = flow_forward(s, &w.flow, p.flow, p.attn_chunk, &input, li, &txt, lt);
                drop(input);
                v
            });
            let step = s.ew(x.n, dt);
            let nx = s.ew(x.n, dt);
            drop((step, v));
            x = nx;
        }
        drop((txt_ids, img_ids, noise));
        x
    };
    w.flow.release();
    s.end_phase();

    s.begin_phase("decode");
    let (latents, image) = {
        let latents = {
            let a = s.cast(&x, F32);
            let u = s.ew(zc * lat_h * lat_w, F32);
            drop(a);
            u
        };
        let vae = Vae {
            s,
            cfg: p.ae,
            chunk: p.attn_chunk,
            dt: w.vae.dtype,
        };
        let image = s.on_host(w.vae.on_cpu(), || {
            let z = if s.host_side() {
                s.act(latents.n, F32)
            } else {
                latents.clone()
            };
            let f = match p.vae_tile {
                // `AutoEncoder::decode_tiled`: the output image on the host, then tile by tile
                // the latent tile, its decode, the weighted tile and its host copy.
                Some(t) if t < 8 * lat_h.max(lat_w) => {
                    let lt = (t / 8).max(1);
                    let ov = vae_tile_overlap(lt);
                    let (ny, nx) = (
                        tile_starts(lat_h, lt, ov).len(),
                        tile_starts(lat_w, lt, ov).len(),
                    );
                    let (th, tw) = (lt.min(lat_h), lt.min(lat_w));
                    let full = s.on_host(true, || s.act(p.ae.out_ch * 64 * lat_h * lat_w, F32));
                    for _ in 0..ny * nx {
                        let zt = s.ew(zc * th * tw, F32);
                        let img = vae.decode(&w.vae, &zt, th, tw);
                        drop(zt);
                        let wt = s.act(64 * th * tw, F32);
                        let f = s.cast(&img, F32);
                        let m = s.ew(img.n, F32);
                        drop((f, img));
                        let v = s.on_host(true, || s.act(m.n, F32));
                        drop((v, m, wt));
                    }
                    if s.host_side() {
                        full
                    } else {
                        let d = s.act_on_device(full.n, F32);
                        drop(full);
                        d
                    }
                }
                _ => {
                    let img = vae.decode(&w.vae, &z, lat_h, lat_w);
                    let f = s.cast(&img, F32);
                    drop(img);
                    f
                }
            };
            drop(z);
            if s.host_side() {
                s.act_on_device(f.n, F32)
            } else {
                f
            }
        });
        (latents, image)
    };
    w.vae.release();
    s.end_phase();
    drop((latents, image, x, txt, vec, cond));
    let mut phases = s.phases.take();
    if let Some(d) = phases.iter_mut().find(|p| p.name == "denoise") {
        d.passes = p.passes;
    }
    phases
}
