// fluxfit web UI: plain modern JavaScript, no build step, no dependencies. It speaks only the
// public HTTP API (/v1/...), sending the API key (if one is set) on every call.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = 'fluxfit.apiKey';
  /** Uploads are downscaled in the browser to at most this many pixels on the long side. */
  const MAX_UPLOAD_SIDE = 2048;
  const POLL_MS = 300;
  const JOB_TABS = ['generate', 'fill', 'edit'];
  const TABS = [...JOB_TABS, 'plan', 'gallery'];

  let apiKey = localStorage.getItem(KEY_STORE) || '';
  let info = null;

  // ---------------------------------------------------------------- small helpers

  /** A mistake found in the page before anything is sent. */
  class UserError extends Error {}

  /** An error answered by the API (its `error.message`), or a failed connection. */
  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  /** Creates an element: h('div', {class: 'x', onclick: f}, child, 'text', ...). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'class') el.className = v;
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? '' : v);
    }
    el.append(...children.flat().filter((c) => c != null && c !== false));
    return el;
  }

  function debounce(fn, ms) {
    let t = 0;
    return (...args) => {
      clearTimeout(t);
      t = setTimeout(() => fn(...args), ms);
    };
  }

  function fmtBytes(b) {
    if (b == null || !isFinite(b)) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) {
      b /= 1024;
      i++;
    }
    const digits = i >= 3 ? 2 : i === 2 && b < 100 ? 1 : 0;
    return `${b.toFixed(digits)} ${units[i]}`;
  }

  function fmtSecs(s) {
    if (s == null || !isFinite(s)) return '–';
    return s < 100 ? `${s.toFixed(1)} s` : `${Math.round(s)} s`;
  }

  function randomSeed() {
    return crypto.getRandomValues(new Uint32Array(1))[0];
  }

  /** A number field's value, checked: an integer or float in [min, max]. */
  function numberField(input, name, { min, max, integer = true, optional = false } = {}) {
    const s = input.value.trim();
    if (s === '') {
      if (optional) return undefined;
      throw new UserError(`${name}: give a value`);
    }
    const v = Number(s);
    if (!isFinite(v) || (integer && !Number.isInteger(v)) || v < min || v > max) {
      throw new UserError(`${name}: ${s} is not ${integer ? 'a whole number' : 'a number'} from ${min} to ${max}`);
    }
    return v;
  }

  function showError(box, message) {
    box.replaceChildren(
      h('span', { class: 'msg' }, message),
      h('button', { type: 'button', class: 'icon close', title: 'Dismiss', onclick: () => (box.hidden = true) }, '✕'),
    );
    box.hidden = false;
  }

  function hideError(box) {
    box.hidden = true;
  }

  const ICONS = {
    lock: '<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true"><rect x="3" y="7" width="10" height="7" rx="1.5" fill="currentColor"/><path d="M5 7V5a3 3 0 0 1 6 0v2" fill="none" stroke="currentColor" stroke-width="1.6"/></svg>',
    dice: '<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true"><rect x="1.5" y="1.5" width="13" height="13" rx="3" fill="none" stroke="currentColor" stroke-width="1.4"/><circle cx="5" cy="5" r="1.2" fill="currentColor"/><circle cx="11" cy="11" r="1.2" fill="currentColor"/><circle cx="8" cy="8" r="1.2" fill="currentColor"/><circle cx="11" cy="5" r="1.2" fill="currentColor"/><circle cx="5" cy="11" r="1.2" fill="currentColor"/></svg>',
  };

  // ---------------------------------------------------------------- the API

  async function api(path, opts = {}) {
    const headers = new Headers(opts.headers || {});
    if (apiKey) headers.set('Authorization', `Bearer ${apiKey}`);
    let body = opts.body;
    if (opts.json !== undefined) {
      headers.set('Content-Type', 'application/json');
      body = JSON.stringify(opts.json);
    }
    let r;
    try {
      r = await fetch(path, { method: opts.method || 'GET', headers, body, cache: 'no-store' });
    } catch (e) {
      throw new ApiError(`cannot reach the server (${e.message})`, 0);
    }
    if (!r.ok) {
      let message = `${r.status} ${r.statusText}`;
      try {
        const j = await r.json();
        if (j && j.error && j.error.message) message = j.error.message;
      } catch (_) {
        // not JSON: keep the status line
      }
      if (r.status === 429) {
        const after = r.headers.get('Retry-After');
        if (after) message += ` (try again in ${after} s)`;
      }
      if (r.status === 401) keyNeeded();
      throw new ApiError(message, r.status);
    }
    if (opts.as === 'blob') return r.blob();
    if (opts.as === 'text') return r.text();
    return r.json();
  }

  /** Images are fetched with the key and shown through object URLs, cached by URL. */
  const objectUrls = new Map();
  function imageUrl(url) {
    let p = objectUrls.get(url);
    if (!p) {
      p = api(url, { as: 'blob' }).then((b) => URL.createObjectURL(b));
      p.catch(() => objectUrls.delete(url));
      objectUrls.set(url, p);
      if (objectUrls.size > 400) {
        const [oldest, op] = objectUrls.entries().next().value;
        objectUrls.delete(oldest);
        op.then((u) => URL.revokeObjectURL(u), () => {});
      }
    }
    return p;
  }

  function loadImg(img, src) {
    return new Promise((resolve, reject) => {
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error('the image could not be shown'));
      img.src = src;
    });
  }

  // ---------------------------------------------------------------- header, key, info

  function keyNeeded() {
    showError($('global-error'), 'This server wants an API key: enter it in the “API key” field at the top right.');
    $('api-key').classList.add('needed');
  }

  const keyInput = $('api-key');
  keyInput.value = apiKey;
  keyInput.addEventListener('change', () => {
    apiKey = keyInput.value.trim();
    if (apiKey) localStorage.setItem(KEY_STORE, apiKey);
    else localStorage.removeItem(KEY_STORE);
    keyInput.classList.remove('needed');
    hideError($('global-error'));
    loadInfo().then(() => gallery.loaded && gallery.load());
  });

  function setChip(id, text, title) {
    const c = $(id);
    c.textContent = text;
    if (title) c.title = title;
    c.hidden = !text;
  }

  function showQueue(q) {
    if (!q) return;
    const text = q.running ? `busy · ${q.waiting} waiting` : q.waiting ? `${q.waiting} waiting` : 'idle';
    setChip('info-queue', text, `queue: ${q.waiting} of ${q.capacity} waiting${q.running ? ', one running' : ''}`);
  }

  const queueNow = debounce(() => {
    api('/v1/info').then((i) => showQueue(i.queue), () => {});
  }, 200);
  /** The queue chip, now and a moment later (the runner lets go of a job just after its end). */
  function refreshQueue() {
    queueNow();
    setTimeout(queueNow, 1000);
  }

  let firstInfo = true;
  async function loadInfo() {
    let i;
    try {
      i = await api('/v1/info');
    } catch (e) {
      // 503: a server behind a broker with no worker yet; asked again until one comes.
      const waiting = e.status === 503;
      setChip('info-model', e.status === 401 ? 'API key needed' : waiting ? 'waiting for a worker' : 'offline');
      if (e.status !== 401) showError($('global-error'), e.message);
      if (waiting) setTimeout(loadInfo, 3000);
      return;
    }
    info = i;
    hideError($('global-error'));
    setChip('info-model', i.model, `model (fluxfit ${i.version})`);
    setChip('info-variant', i.variant, 'variant');
    setChip('info-device', i.budget ? `${i.device} · budget ${fmtBytes(i.budget)}` : i.device, 'device');
    showQueue(i.queue);
    document.title = `fluxfit · ${i.model}`;
    if (firstInfo) {
      firstInfo = false;
      setupTabs(i);
      generate.init(i);
      fill.init(i);
      edit.init(i);
      plan.init(i);
    }
    document.body.dataset.ready = '1';
  }

  // ---------------------------------------------------------------- tabs

  let currentTab = null;
  const tabRunnable = {};

  function setupTabs(i) {
    const m = new Set(i.modes);
    const why = `this server runs ${i.model} (${i.variant})`;
    tabRunnable.generate = m.has('generate') || m.has('control');
    tabRunnable.fill = m.has('fill') || m.has('outpaint');
    tabRunnable.edit = m.has('edit');
    // Behind a broker each worker plans its own jobs: there is no one table to show.
    tabRunnable.plan = !i.broker;
    tabRunnable.gallery = true;
    const needs = {
      generate: 'needs a text-to-image model (schnell, dev) or a Canny/Depth model',
      fill: 'needs the FLUX.1 Fill model',
      edit: 'needs the FLUX.1 Kontext model',
    };
    if (i.broker) {
      $('tab-plan').disabled = true;
      $('tab-plan').title = 'this server runs its jobs on workers, each planning its own: run `fluxfit plan` with a worker\'s flags';
    }
    for (const t of JOB_TABS) {
      const b = $(`tab-${t}`);
      b.disabled = !tabRunnable[t];
      b.title = tabRunnable[t] ? '' : `${needs[t]}: ${why}`;
    }
    if (m.has('control')) $('tab-generate').textContent = 'Control';
    const hash = location.hash.slice(1);
    const first = JOB_TABS.find((t) => tabRunnable[t]) || (tabRunnable.plan ? 'plan' : 'gallery');
    showTab(TABS.includes(hash) && tabRunnable[hash] ? hash : first);
  }

  function showTab(name) {
    if (!tabRunnable[name]) return;
    for (const t of TABS) {
      const on = t === name;
      const b = $(`tab-${t}`);
      b.setAttribute('aria-selected', String(on));
      b.tabIndex = on ? 0 : -1;
      $(`panel-${t}`).hidden = !on;
    }
    currentTab = name;
    if (location.hash !== `#${name}`) history.replaceState(null, '', `#${name}`);
    if (name === 'gallery' && !gallery.loaded) gallery.load();
    if (name === 'plan' && !plan.loaded) plan.run();
    if (name === 'fill') fill.layout();
  }

  for (const t of TABS) $(`tab-${t}`).addEventListener('click', () => showTab(t));
  $('tab-generate').parentElement.addEventListener('keydown', (e) => {
    if (e.key !== 'ArrowLeft' && e.key !== 'ArrowRight') return;
    const open = TABS.filter((t) => tabRunnable[t]);
    const i = open.indexOf(currentTab);
    const next = open[(i + (e.key === 'ArrowRight' ? 1 : open.length - 1)) % open.length];
    showTab(next);
    $(`tab-${next}`).focus();
  });

  // ---------------------------------------------------------------- seeds

  /** A seed field with previous/next buttons and a random/locked toggle. */
  class Seed {
    constructor(prefix) {
      this.input = $(`${prefix}seed`);
      this.lockBtn = $(`${prefix}seed-lock`);
      this.setLocked(false);
      this.input.value = String(randomSeed());
      $(`${prefix}seed-prev`).addEventListener('click', () => this.step(-1));
      $(`${prefix}seed-next`).addEventListener('click', () => this.step(1));
      this.lockBtn.addEventListener('click', () => this.setLocked(!this.locked));
      // Typing a seed means wanting that seed.
      this.input.addEventListener('input', () => this.input.value !== '' && this.setLocked(true));
    }

    setLocked(on) {
      this.locked = on;
      this.lockBtn.setAttribute('aria-pressed', String(on));
      this.lockBtn.innerHTML = `${on ? ICONS.lock : ICONS.dice}<span>${on ? 'locked' : 'random'}</span>`;
      this.lockBtn.title = on
        ? 'Locked: every run uses this seed. Click for a random seed each run.'
        : 'Random: a new seed each run. Click to keep this one.';
    }

    step(d) {
      const v = Number(this.input.value) || 0;
      this.input.value = String(Math.max(0, Math.min(Number.MAX_SAFE_INTEGER, Math.floor(v) + d)));
      this.setLocked(true);
    }

    /** The seed for the next run: a new random one unless locked. */
    forRun() {
      if (!this.locked || this.input.value.trim() === '') this.input.value = String(randomSeed());
      return numberField(this.input, 'seed', { min: 0, max: Number.MAX_SAFE_INTEGER });
    }

    set(v) {
      if (v == null || v === '') return;
      this.input.value = String(v);
      this.setLocked(true);
    }
  }

  // ---------------------------------------------------------------- images from files

  /**
   * Reads an image file into a canvas, downscaled to MAX_UPLOAD_SIDE on the long side.
   * Returns {canvas, width, height, origWidth, origHeight, scaled, hasAlpha, name}.
   */
  async function readImage(blob, name) {
    let bmp;
    try {
      bmp = await createImageBitmap(blob);
    } catch (_) {
      throw new UserError(`${name}: not an image this browser can read (PNG or JPEG expected)`);
    }
    const ow = bmp.width;
    const oh = bmp.height;
    const s = Math.min(1, MAX_UPLOAD_SIDE / Math.max(ow, oh));
    const w = Math.max(1, Math.round(ow * s));
    const hh = Math.max(1, Math.round(oh * s));
    const canvas = document.createElement('canvas');
    canvas.width = w;
    canvas.height = hh;
    const ctx = canvas.getContext('2d', { willReadFrequently: true });
    ctx.imageSmoothingQuality = 'high';
    ctx.drawImage(bmp, 0, 0, w, hh);
    if (bmp.close) bmp.close();
    const d = ctx.getImageData(0, 0, w, hh).data;
    let hasAlpha = false;
    for (let i = 3; i < d.length; i += 4) {
      if (d[i] < 255) {
        hasAlpha = true;
        break;
      }
    }
    return { canvas, width: w, height: hh, origWidth: ow, origHeight: oh, scaled: s < 1, hasAlpha, name, dataUrl: null };
  }

  function imageDataUrl(img) {
    if (!img.dataUrl) img.dataUrl = img.canvas.toDataURL('image/png');
    return img.dataUrl;
  }

  function describeImage(img) {
    const base = `${img.name} · ${img.origWidth}×${img.origHeight}`;
    return img.scaled ? `${base} → downscaled to ${img.width}×${img.height}` : base;
  }

  /** The image of a finished job's result (its object URL's bytes), to use as a new input. */
  async function resultBlob(view) {
    const src = view.el.result.src;
    if (!src) throw new UserError('no result yet');
    return (await fetch(src)).blob();
  }

  /** Drop and paste of image files onto an element. */
  function acceptDrops(el, onFile) {
    el.addEventListener('dragover', (e) => {
      if ([...e.dataTransfer.types].includes('Files')) {
        e.preventDefault();
        el.classList.add('over');
      }
    });
    el.addEventListener('dragleave', () => el.classList.remove('over'));
    el.addEventListener('drop', (e) => {
      el.classList.remove('over');
      const f = [...e.dataTransfer.files].find((f) => f.type.startsWith('image/'));
      if (f) {
        e.preventDefault();
        onFile(f);
      }
    });
  }

  function placeholderSvg(w, h, text) {
    const m = Math.max(w, h);
    const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}">` +
      `<rect x="${m / 200}" y="${m / 200}" width="${w - m / 100}" height="${h - m / 100}" rx="${m / 80}" fill="#17181b" stroke="#3b3e45" stroke-width="${m / 200}" stroke-dasharray="${m / 60} ${m / 90}"/>` +
      `<text x="50%" y="50%" fill="#6d717a" font-family="DejaVu Sans, sans-serif" font-size="${m / 20}" text-anchor="middle" dominant-baseline="middle">${text}</text></svg>`;
    return `data:image/svg+xml,${encodeURIComponent(svg)}`;
  }

  // ---------------------------------------------------------------- parameters

  const PARAM_ORDER = [
    ['prompt', 'prompt'], ['mode', 'mode'], ['seed', 'seed'], ['size', 'size'], ['steps', 'steps'],
    ['guidance', 'guidance'], ['strength', 'strength'], ['init_image', 'init image'],
    ['control', 'control'], ['control_image', 'control image'], ['fill_mask', 'fill mask'],
    ['fill_image', 'fill image'], ['aspect_ratio', 'aspect ratio'], ['edit_image_size', 'edit image'],
    ['model', 'model'], ['variant', 'variant'], ['plan', 'plan'], ['dtype', 'dtype'],
    ['t5_tokens', 'T5 tokens'], ['noise', 'noise'], ['time', 'time'], ['peak', 'peak memory'],
    ['software', 'software'], ['job', 'job'],
  ];
  const PARAM_SKIP = new Set(['parameters', 'width', 'height']);

  /** Fills a <dl> with an image's parameters (its PNG text chunks), plus extras. */
  function renderParams(dl, p, extra = {}) {
    const all = { ...p, ...extra };
    if (p.width && p.height) all.size = `${p.width}×${p.height}`;
    const rows = [];
    const seen = new Set();
    for (const [k, label] of PARAM_ORDER) {
      if (all[k] == null || all[k] === '') continue;
      seen.add(k);
      rows.push([k, label, all[k]]);
    }
    for (const [k, v] of Object.entries(all)) {
      if (seen.has(k) || PARAM_SKIP.has(k) || v == null || v === '') continue;
      rows.push([k, k.replace(/_/g, ' '), v]);
    }
    dl.replaceChildren(
      ...rows.flatMap(([k, label, v]) => [
        h('dt', { dataset: { key: k } }, label),
        h('dd', { dataset: { key: k }, class: k === 'prompt' ? 'prompt' : k === 'plan' || k === 'job' ? 'mono' : null }, String(v)),
      ]),
    );
  }

  // ---------------------------------------------------------------- a job, followed live

  const PHASES = { encode: 'encoding', denoise: 'denoising', decode: 'decoding' };

  /**
   * The output side of a job tab: status, progress, live preview, result and its parameters.
   * Element ids are the template's data-id with the tab's prefix ('' for Generate).
   */
  class JobView {
    constructor(prefix, mount, opts) {
      const frag = $('job-template').content.cloneNode(true);
      this.el = {};
      for (const e of frag.querySelectorAll('[data-id]')) {
        e.id = `${prefix}${e.dataset.id}`;
        this.el[e.dataset.id] = e;
      }
      mount.append(frag);
      this.opts = opts;
      this.job = null;
      this.token = 0;
      this.params = null;
      this.resultName = null;
      opts.cancelBtn.addEventListener('click', () => this.cancel());
      this.el.reuse.addEventListener('click', () => this.params && opts.onReuse(this.params));
      if (opts.again) {
        this.el.again.textContent = opts.again.label;
        this.el.again.hidden = false;
        this.el.again.addEventListener('click', () => guarded(opts.errorBox, () => opts.again.run(this)));
      }
      this.showPlaceholder(256, 256, 'no image yet');
    }

    get running() {
      return this.job != null;
    }

    showPlaceholder(w, h, text) {
      this.el.placeholder.src = placeholderSvg(w, h, text || `${w} × ${h}`);
      this.el.placeholder.hidden = false;
      this.el.preview.hidden = true;
      this.el.result.hidden = true;
    }

    /** Updates the empty frame to the size asked, unless an image is on show. */
    frame(w, h) {
      if (!this.running && this.el.result.hidden && w >= 16 && h >= 16) this.showPlaceholder(w, h);
    }

    status(text, cls) {
      if (this.job && this.job.cancelling && (cls === 'run' || cls === 'wait')) {
        text = 'Cancelling… (after the step in progress)';
        cls = 'wait';
      }
      this.el.status.textContent = text;
      this.el.status.className = `status ${cls || ''}`;
    }

    setProgress(step, total, text) {
      const p = this.el.progress;
      p.max = Math.max(1, total);
      p.value = step;
      if (step > Number(p.dataset.maxStep || 0)) p.dataset.maxStep = String(step);
      this.el['progress-text'].textContent = text || '';
    }

    busy(on) {
      this.opts.runBtn.disabled = on;
      this.opts.cancelBtn.hidden = !on;
      this.opts.cancelBtn.disabled = false;
    }

    /** Submits `body` and follows the job; `size` is the image expected, for the frame. */
    async start(body, size) {
      if (this.running) return;
      hideError(this.opts.errorBox);
      const token = ++this.token;
      this.closeStream();
      this.job = { id: null };
      this.busy(true);
      this.el['result-meta'].hidden = true;
      this.el.result.removeAttribute('src');
      this.el.preview.removeAttribute('src');
      this.showPlaceholder(size.width, size.height, 'submitting…');
      this.setProgress(0, body.steps || 1, '');
      this.el.progress.dataset.maxStep = '0';
      this.el.progress.dataset.steps = '';
      this.status('submitting…');
      let view;
      try {
        view = await api('/v1/jobs', { method: 'POST', json: body });
      } catch (e) {
        if (token !== this.token) return;
        this.job = null;
        this.busy(false);
        this.status('Ready');
        this.showPlaceholder(size.width, size.height);
        showError(this.opts.errorBox, e.message);
        return;
      }
      if (token !== this.token) return;
      this.job = { id: view.id, total: view.total, width: size.width, height: size.height, t0: 0, s0: 0 };
      this.showPlaceholder(size.width, size.height, 'queued');
      this.status(view.position ? `Queued · position ${view.position}` : 'Queued', 'wait');
      this.setProgress(0, view.total, '');
      this.el.progress.dataset.job = view.id;
      refreshQueue();
      if (!apiKey && 'EventSource' in window) this.stream(view, token);
      else this.poll(view.id, token);
    }

    /** Server-Sent Events: live steps and previews (only without a key: no headers). */
    stream(view, token) {
      const es = new EventSource(view.events);
      this.es = es;
      const on = (name, fn) =>
        es.addEventListener(name, (e) => {
          if (token !== this.token) return;
          let d = {};
          try {
            d = JSON.parse(e.data);
          } catch (_) {
            return;
          }
          fn(d);
        });
      on('queued', (d) => this.status(`Queued · position ${d.position}`, 'wait'));
      on('started', (d) => {
        this.job.total = d.steps;
        this.job.width = d.width;
        this.job.height = d.height;
        this.status(`Running · seed ${d.seed}`, 'run');
        this.showPlaceholder(d.width, d.height, 'starting…');
        this.setProgress(0, d.steps, `plan ${d.plan}`);
        refreshQueue();
      });
      on('phase', (d) => {
        const running = `Running · ${PHASES[d.phase] || d.phase}`;
        this.status(running, 'run');
        if (this.el.preview.hidden) this.showPlaceholder(this.job.width, this.job.height, `${PHASES[d.phase] || d.phase}…`);
      });
      on('step', (d) => this.onStep(d.step, d.total, d.rate, d.eta_s));
      on('preview', (d) => {
        this.el.preview.src = d.png;
        this.el.preview.hidden = false;
        this.el.placeholder.hidden = true;
      });
      on('done', (d) => {
        this.closeStream();
        this.finish(d.image, d.seconds, d.peak_bytes, token);
      });
      on('failed', (d) => {
        this.closeStream();
        this.end('Failed', 'bad');
        showError(this.opts.errorBox, d.error || 'the job failed');
      });
      on('cancelled', (d) => {
        this.closeStream();
        this.end(d.step ? `Cancelled at step ${d.step}` : 'Cancelled', 'bad');
      });
      es.onerror = () => {
        // A closed stream (not a reconnect in progress): follow the job by polling instead.
        if (this.es === es && es.readyState === EventSource.CLOSED) {
          this.closeStream();
          if (token === this.token && this.running) this.poll(this.job.id, token);
        }
      };
    }

    closeStream() {
      if (this.es) {
        this.es.close();
        this.es = null;
      }
    }

    /** Polling `GET /v1/jobs/{id}` (with a key: EventSource cannot send one). */
    poll(id, token) {
      let failures = 0;
      const once = async () => {
        if (token !== this.token) return;
        let v;
        try {
          v = await api(`/v1/jobs/${encodeURIComponent(id)}`);
          failures = 0;
        } catch (e) {
          if (token !== this.token) return;
          if (e.status === 404 || e.status === 401 || ++failures > 20) {
            this.end('Lost', 'bad');
            showError(this.opts.errorBox, e.message);
            return;
          }
          setTimeout(once, POLL_MS * 2);
          return;
        }
        if (token !== this.token) return;
        if (v.status === 'queued') {
          this.status(v.position ? `Queued · position ${v.position}` : 'Queued', 'wait');
        } else if (v.status === 'running') {
          this.status(v.step && v.step === v.total ? 'Running · decoding' : `Running · seed ${v.params && v.params.seed}`, 'run');
          if (v.step > 0 && v.step !== this.job.step) {
            // The rate over the steps seen since polling began.
            const now = performance.now();
            if (!this.job.t0) {
              this.job.t0 = now;
              this.job.s0 = v.step;
            }
            this.job.step = v.step;
            const dt = (now - this.job.t0) / 1000;
            const rate = dt > 0 && v.step > this.job.s0 ? (v.step - this.job.s0) / dt : null;
            this.onStep(v.step, v.total, rate, rate ? (v.total - v.step) / rate : null);
          }
        } else if (v.status === 'done') {
          this.finish(v.image, v.seconds, null, token);
          return;
        } else if (v.status === 'failed') {
          this.end('Failed', 'bad');
          showError(this.opts.errorBox, v.error || 'the job failed');
          return;
        } else if (v.status === 'cancelled') {
          this.end(v.step ? `Cancelled at step ${v.step}` : 'Cancelled', 'bad');
          return;
        }
        setTimeout(once, POLL_MS);
      };
      once();
    }

    onStep(step, total, rate, eta) {
      const parts = [`step ${step}/${total}`];
      if (rate != null && isFinite(rate)) parts.push(rate >= 1 ? `${rate.toFixed(1)} it/s` : `${(1 / rate).toFixed(1)} s/it`);
      if (eta != null && isFinite(eta)) parts.push(`eta ${Math.ceil(eta)} s`);
      this.setProgress(step, total, parts.join(' · '));
      const p = this.el.progress;
      p.dataset.steps = p.dataset.steps ? `${p.dataset.steps},${step}` : String(step);
    }

    /** A job that ended without an image. */
    end(text, cls) {
      this.job = null;
      this.busy(false);
      this.status(text, cls);
      refreshQueue();
    }

    async finish(image, seconds, peak, token) {
      const total = this.job ? this.job.total : 1;
      this.job = null;
      this.busy(false);
      this.setProgress(total, total, `${fmtSecs(seconds)}${peak ? ` · peak ${fmtBytes(peak)}` : ''}`);
      this.status('Done', 'ok');
      refreshQueue();
      this.opts.onFinished();
      try {
        const [src, p] = await Promise.all([imageUrl(image.url), api(`${image.url}?params`)]);
        if (token !== this.token) return;
        await loadImg(this.el.result, src);
        if (token !== this.token) return;
        this.el.result.hidden = false;
        this.el.preview.hidden = true;
        this.el.placeholder.hidden = true;
        this.params = p.params || {};
        this.resultName = image.name;
        this.el.download.href = src;
        this.el.download.download = image.name;
        renderParams(this.el['result-params'], this.params, {
          time: seconds != null ? fmtSecs(seconds) : null,
          peak: peak ? fmtBytes(peak) : null,
        });
        this.el['result-meta'].hidden = false;
      } catch (e) {
        if (token === this.token) showError(this.opts.errorBox, `the image was written but could not be shown: ${e.message}`);
      }
    }

    async cancel() {
      const id = this.job && this.job.id;
      if (!id) return;
      this.opts.cancelBtn.disabled = true;
      this.job.cancelling = true;
      this.status('', 'wait');
      try {
        await api(`/v1/jobs/${encodeURIComponent(id)}`, { method: 'DELETE' });
      } catch (e) {
        if (e.status !== 409) showError(this.opts.errorBox, e.message);
      }
    }
  }

  /** Ctrl+Enter (or Cmd+Enter) in a prompt submits its form. */
  function submitOnCtrlEnter(textarea, form) {
    textarea.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        form.requestSubmit();
      }
    });
  }

  /** Runs `fn`, showing a UserError (or any error) in the tab's error box. */
  async function guarded(box, fn) {
    try {
      hideError(box);
      await fn();
    } catch (e) {
      showError(box, e.message || String(e));
    }
  }

  // ---------------------------------------------------------------- Generate

  const generate = (() => {
    const errorBox = $('generate-error');
    const form = $('generate-form');
    const widthIn = $('width');
    const heightIn = $('height');
    const stepsIn = $('steps');
    const guidanceIn = $('guidance');
    const estimateEl = $('plan-estimate');
    let seed;
    let view;
    let init = null;
    let control = false;
    let maxSide = 4096;

    const snap16 = (v) => Math.max(64, Math.min(maxSide, Math.round(v / 16) * 16));

    function presets(i) {
      const d = [i.defaults.width, i.defaults.height];
      const list = [
        ['1:1', 1024, 1024], ['16:9', 1360, 768], ['9:16', 768, 1360], ['4:3', 1152, 864], ['3:4', 864, 1152],
      ];
      const out = [];
      if (!list.some(([, w, hh]) => w === d[0] && hh === d[1])) out.push(['default', d[0], d[1]]);
      out.push(...list.filter(([, w, hh]) => w <= i.max_side && hh <= i.max_side));
      const box = $('size-presets');
      box.replaceChildren(
        ...out.map(([label, w, hh]) =>
          h('button', {
            type: 'button', class: 'chip-btn', dataset: { w, h: hh },
            title: label === 'default' ? "the model's default size" : `${label} at about 1 MP`,
            onclick: () => setSize(w, hh),
          }, h('b', {}, label), ` ${w === hh ? `${w}²` : `${w}×${hh}`}`),
        ),
      );
    }

    function markPreset() {
      for (const b of $('size-presets').children) {
        b.classList.toggle('on', b.dataset.w === widthIn.value && b.dataset.h === heightIn.value);
      }
    }

    function setSize(w, hh) {
      widthIn.value = String(w);
      heightIn.value = String(hh);
      sizeChanged();
    }

    function sizeChanged() {
      markPreset();
      const w = Number(widthIn.value);
      const hh = Number(heightIn.value);
      if (view && w >= 64 && hh >= 64) view.frame(snap16(w), snap16(hh));
      scheduleEstimate();
    }

    let estimateSeq = 0;
    /** Plans by query: the server's budget does not change while the page is open. */
    const estimates = new Map();
    async function estimate() {
      if (!tabRunnable.generate) return;
      if (info && info.broker) {
        estimateEl.hidden = true;
        return;
      }
      const seq = ++estimateSeq;
      const w = Number(widthIn.value);
      const hh = Number(heightIn.value);
      if (!(w >= 64 && hh >= 64 && w <= maxSide && hh <= maxSide)) {
        estimateEl.className = 'estimate bad';
        estimateEl.textContent = `width and height: 64 to ${maxSide}`;
        return;
      }
      const q = new URLSearchParams({ width: String(snap16(w)), height: String(snap16(hh)), image_input: String(!!init || control) });
      const steps = Number(stepsIn.value);
      if (Number.isInteger(steps) && steps >= 1 && steps <= 1000) q.set('steps', String(steps));
      try {
        const key = q.toString();
        let r = estimates.get(key);
        if (!r) {
          estimateEl.classList.add('busy');
          r = await api(`/v1/plan?${q}`);
          estimates.set(key, r);
        }
        if (seq !== estimateSeq) return;
        if (r.plan) {
          estimateEl.className = `estimate${r.plan.fits === false ? ' bad' : ''}`;
          estimateEl.replaceChildren(
            h('span', { class: 'k' }, 'peak '), h('b', {}, fmtBytes(r.plan.peak)),
            h('span', { class: 'k' }, ' · time '), h('b', {}, fmtSecs(r.plan.time_s)),
            h('span', { class: 'k plan' }, ` · ${r.plan.label}`),
          );
          estimateEl.title = `The planner's prediction for ${r.width}×${r.height}, ${r.steps} steps: plan ${r.plan.spec}`;
        } else {
          estimateEl.className = 'estimate bad';
          estimateEl.textContent = `no plan fits the budget${r.budget ? ` of ${fmtBytes(r.budget)}` : ''} at this size`;
        }
      } catch (e) {
        if (seq !== estimateSeq) return;
        estimateEl.className = 'estimate bad';
        estimateEl.textContent = e.message;
      }
    }
    const scheduleEstimate = debounce(estimate, 250);

    async function setInit(blob, name) {
      await guarded(errorBox, async () => {
        init = await readImage(blob, name);
        const t = $('init-thumb');
        t.src = init.canvas.toDataURL('image/jpeg', 0.8);
        t.hidden = false;
        $('init-clear').hidden = false;
        $('init-note').textContent = describeImage(init);
        $('init-box').open = true;
        // The output takes the image's size (as the server would), rounded to 16.
        setSize(snap16(init.width), snap16(init.height));
        modeNote();
      });
    }

    function clearInit() {
      init = null;
      $('init-thumb').hidden = true;
      $('init-thumb').removeAttribute('src');
      $('init-clear').hidden = true;
      $('init-file').value = '';
      $('init-note').textContent = 'PNG or JPEG; larger than 2048 px is downscaled in the browser.';
      modeNote();
      scheduleEstimate();
    }

    function modeNote() {
      $('generate').textContent = control ? 'Generate' : init ? 'Generate (img2img)' : 'Generate';
    }

    function apply(p) {
      if (p.prompt != null) $('prompt').value = p.prompt;
      if (p.width && p.height) setSize(Number(p.width), Number(p.height));
      if (p.steps) stepsIn.value = String(p.steps);
      if (p.guidance) guidanceIn.value = String(Number(p.guidance));
      if (p.strength) {
        $('strength').value = String(p.strength);
        $('strength-value').textContent = Number(p.strength).toFixed(2);
      }
      seed.set(p.seed);
      scheduleEstimate();
    }

    async function run() {
      await guarded(errorBox, async () => {
        const body = {
          mode: control ? 'control' : init ? 'img2img' : 'generate',
          prompt: $('prompt').value,
          width: numberField(widthIn, 'width', { min: 64, max: maxSide }),
          height: numberField(heightIn, 'height', { min: 64, max: maxSide }),
          steps: numberField(stepsIn, 'steps', { min: 1, max: 1000 }),
          guidance: numberField(guidanceIn, 'guidance', { min: 0, max: 100, integer: false }),
        };
        if (body.width % 16 || body.height % 16) {
          body.width = snap16(body.width);
          body.height = snap16(body.height);
          setSize(body.width, body.height);
        }
        if (control && !init) throw new UserError('control needs a control image: choose one under “Control image”');
        if (init) body.image = imageDataUrl(init);
        if (body.mode === 'img2img') body.strength = Number($('strength').value);
        if (control) body.control_raw = $('control-raw').checked;
        body.seed = seed.forRun();
        await view.start(body, { width: body.width, height: body.height });
      });
    }

    function init_(i) {
      maxSide = i.max_side;
      control = i.modes.includes('control');
      seed = new Seed('');
      view = new JobView('', $('generate-output'), {
        runBtn: $('generate'),
        cancelBtn: $('cancel'),
        errorBox,
        onReuse: (p) => {
          apply(p);
          $('prompt').focus();
        },
        onFinished: () => gallery.load(),
        again: i.modes.includes('img2img') || control
          ? {
            label: control ? 'Use as control image' : 'Use as init image',
            run: async (v) => setInit(await resultBlob(v), v.resultName || 'result.png'),
          }
          : null,
      });
      for (const el of [widthIn, heightIn]) {
        el.max = String(maxSide);
        el.addEventListener('input', sizeChanged);
        el.addEventListener('change', () => {
          // Rounded to a multiple of 16; out of range stays, for the estimate and Generate to say.
          const v = Number(el.value);
          if (v > 0) el.value = String(Math.max(16, Math.round(v / 16) * 16));
          sizeChanged();
        });
      }
      stepsIn.addEventListener('input', scheduleEstimate);
      $('size-swap').addEventListener('click', () => setSize(Number(heightIn.value), Number(widthIn.value)));
      presets(i);
      stepsIn.value = String(i.defaults.steps);
      guidanceIn.value = String(i.defaults.guidance);
      setSize(i.defaults.width, i.defaults.height);
      $('strength').addEventListener('input', () => ($('strength-value').textContent = Number($('strength').value).toFixed(2)));
      $('init-file').addEventListener('change', (e) => e.target.files[0] && setInit(e.target.files[0], e.target.files[0].name));
      $('init-clear').addEventListener('click', clearInit);
      acceptDrops($('init-box'), (f) => setInit(f, f.name));
      if (control) {
        $('init-summary').replaceChildren('Control image ', h('small', { class: 'hint' }, 'required'));
        $('init-box').open = true;
        $('strength-field').hidden = true;
        $('control-raw-field').hidden = false;
      } else if (!i.modes.includes('img2img')) {
        $('init-box').hidden = true;
      }
      form.addEventListener('submit', (e) => {
        e.preventDefault();
        run();
      });
      submitOnCtrlEnter($('prompt'), form);
      estimate();
    }

    return {
      init: init_,
      apply,
      setInit,
    };
  })();

  // ---------------------------------------------------------------- Fill

  /** The reference's size rules, mirrored to preview the canvas a fill will get. */
  const geometry = (() => {
    const roundHalfEven = (x) => {
      const r = Math.round(x);
      return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
    };
    const snap32 = (v) => 32 * roundHalfEven(v / 32);
    function fillSize(w, hh) {
      const mp = (w * hh) / 1e6;
      const s = mp < 0.5 ? Math.sqrt(0.5 / mp) : mp > 2 ? Math.sqrt(2 / mp) : 1;
      return [Math.max(32, snap32(w * s)), Math.max(32, snap32(hh * s))];
    }
    function pads(orig, a, b, zoom) {
      const z = zoom > 1 ? Math.floor((orig * (zoom - 1)) / 2) : 0;
      return [Math.floor(orig * a) + z, Math.floor(orig * b) + z];
    }
    function outpaint(w, hh, o) {
      const axis = (orig, a, b) => {
        const want = orig + a + b;
        const size = Math.max(snap32(want), 32 * Math.ceil(orig / 32));
        const share = a + b === 0 ? 0.5 : a / (a + b);
        const pos = Math.min(Math.max(0, Math.round(a + (size - want) * share)), size - orig);
        return [size, pos];
      };
      const [l, r] = pads(w, o.left, o.right, o.zoom);
      const [u, d] = pads(hh, o.up, o.down, o.zoom);
      const [cw, px] = axis(w, l, r);
      const [ch, py] = axis(hh, u, d);
      const ox = Math.min(Math.floor(o.overlap * w), Math.floor(w / 2));
      const oy = Math.min(Math.floor(o.overlap * hh), Math.floor(hh / 2));
      return { canvas: [cw, ch], paste: [px, py], keep: [px + ox, py + oy, px + w - ox, py + hh - oy] };
    }
    return { fillSize, outpaint };
  })();

  const MASK_COLOR = '#ff3d7f';

  const fill = (() => {
    const errorBox = $('fill-error');
    const form = $('fill-form');
    const stage = $('fill-stage');
    const paint = $('fill-paint');
    const imageCanvas = $('fill-image-canvas');
    const maskCanvas = $('fill-canvas');
    const ring = $('brush-ring');
    const opCanvas = $('outpaint-canvas');
    const sizeIn = $('brush-size');
    let mctx = null;
    let img = null;
    let mode = 'fill';
    let erase = false;
    let seed;
    let view;
    let scale = 1;
    let stroke = null;

    function layout() {
      if (!img) return;
      const sw = stage.clientWidth;
      const sh = stage.clientHeight;
      if (!sw || !sh) return;
      scale = Math.min(sw / img.width, sh / img.height);
      paint.style.width = `${Math.floor(img.width * scale)}px`;
      paint.style.height = `${Math.floor(img.height * scale)}px`;
    }

    async function load(blob, name) {
      await guarded(errorBox, async () => {
        img = await readImage(blob, name);
        imageCanvas.width = maskCanvas.width = img.width;
        imageCanvas.height = maskCanvas.height = img.height;
        imageCanvas.getContext('2d').drawImage(img.canvas, 0, 0);
        mctx = maskCanvas.getContext('2d', { willReadFrequently: true });
        mctx.clearRect(0, 0, img.width, img.height);
        if (img.hasAlpha) {
          // Transparent pixels are where to paint: start the mask from them.
          const src = img.canvas.getContext('2d').getImageData(0, 0, img.width, img.height).data;
          const m = mctx.createImageData(img.width, img.height);
          const [r, g, b] = [0xff, 0x3d, 0x7f];
          for (let i = 0; i < src.length; i += 4) {
            m.data[i] = r;
            m.data[i + 1] = g;
            m.data[i + 2] = b;
            m.data[i + 3] = 255 - src[i + 3];
          }
          mctx.putImageData(m, 0, 0);
        }
        const brush = Math.max(4, Math.min(400, Math.round(Math.max(img.width, img.height) / 10)));
        sizeIn.value = String(brush);
        $('brush-size-value').textContent = String(brush);
        $('fill-empty').hidden = true;
        $('fill-input-info').textContent = describeImage(img) + (img.hasAlpha ? ' · transparency as the mask' : '');
        $('fill-note').textContent = img.scaled
          ? `Downscaled in the browser from ${img.origWidth}×${img.origHeight} to ${img.width}×${img.height} (at most 2048 px on the long side).`
          : 'Images larger than 2048 px on the long side are downscaled in the browser before sending.';
        showMode();
      });
    }

    function showMode() {
      const out = mode === 'outpaint';
      $('fill-mode-inpaint').setAttribute('aria-checked', String(!out));
      $('fill-mode-outpaint').setAttribute('aria-checked', String(out));
      $('fill-brush').hidden = out;
      $('fill-outpaint').hidden = !out;
      $('fill-run').textContent = out ? 'Outpaint' : 'Fill';
      paint.hidden = !img || out;
      opCanvas.hidden = !img || !out;
      if (img && out) drawOutpaint();
      if (img && !out) layout();
      if (view && !view.running) view.frame(...outputSize());
    }

    function borders() {
      const v = (id) => Number($(id).value);
      return { left: v('op-left'), right: v('op-right'), up: v('op-up'), down: v('op-down'), overlap: v('op-overlap'), zoom: v('op-zoom') };
    }

    /** The size the server will resize the input to (unless keep size). */
    function inputSize() {
      if (!img) return [256, 256];
      return $('fill-keep-size').checked ? [img.width, img.height] : geometry.fillSize(img.width, img.height);
    }

    function outputSize() {
      const [w, hh] = inputSize();
      return mode === 'outpaint' ? geometry.outpaint(w, hh, borders()).canvas : [w, hh];
    }

    function drawOutpaint() {
      const o = borders();
      for (const k of ['left', 'right', 'up', 'down', 'overlap']) $(`op-${k}-value`).textContent = String(o[k]);
      $('op-zoom-value').textContent = o.zoom.toFixed(2);
      if (!img) return;
      const [w, hh] = inputSize();
      const g = geometry.outpaint(w, hh, o);
      const [cw, ch] = g.canvas;
      opCanvas.width = cw;
      opCanvas.height = ch;
      const c = opCanvas.getContext('2d');
      c.fillStyle = '#24262b';
      c.fillRect(0, 0, cw, ch);
      c.drawImage(img.canvas, g.paste[0], g.paste[1], w, hh);
      const [x0, y0, x1, y1] = g.keep;
      c.save();
      c.beginPath();
      c.rect(0, 0, cw, ch);
      c.rect(x0, y0, x1 - x0, y1 - y0);
      c.fillStyle = 'rgba(255, 61, 127, 0.35)';
      c.fill('evenodd');
      c.restore();
      c.setLineDash([Math.max(4, cw / 80), Math.max(3, cw / 120)]);
      c.lineWidth = Math.max(1, cw / 400);
      c.strokeStyle = '#e8e8ea';
      c.strokeRect(g.paste[0], g.paste[1], w, hh);
      $('op-size').textContent = `canvas ${cw}×${ch}, the image (${w}×${hh}) at ${g.paste[0]},${g.paste[1]}; pink: painted`;
      if (view && !view.running) view.frame(cw, ch);
    }

    function pos(e) {
      const r = maskCanvas.getBoundingClientRect();
      return [((e.clientX - r.left) * maskCanvas.width) / r.width, ((e.clientY - r.top) * maskCanvas.height) / r.height];
    }

    function dab(a, b) {
      const size = Number(sizeIn.value);
      mctx.save();
      mctx.globalCompositeOperation = erase ? 'destination-out' : 'source-over';
      mctx.strokeStyle = mctx.fillStyle = MASK_COLOR;
      mctx.lineWidth = size;
      mctx.lineCap = mctx.lineJoin = 'round';
      mctx.beginPath();
      if (a[0] === b[0] && a[1] === b[1]) {
        mctx.arc(a[0], a[1], size / 2, 0, Math.PI * 2);
        mctx.fill();
      } else {
        mctx.moveTo(a[0], a[1]);
        mctx.lineTo(b[0], b[1]);
        mctx.stroke();
      }
      mctx.restore();
    }

    function moveRing(e) {
      const r = paint.getBoundingClientRect();
      const d = Number(sizeIn.value) * (r.width / maskCanvas.width);
      ring.style.width = ring.style.height = `${d}px`;
      ring.style.left = `${e.clientX - r.left - d / 2}px`;
      ring.style.top = `${e.clientY - r.top - d / 2}px`;
      ring.hidden = false;
    }

    function setErase(on) {
      erase = on;
      $('brush-paint').setAttribute('aria-checked', String(!on));
      $('brush-erase').setAttribute('aria-checked', String(on));
      ring.classList.toggle('erase', on);
    }

    /** The mask as the server wants it: a PNG the image's size, white where painted on black. */
    function maskPng() {
      const { width: w, height: hh } = maskCanvas;
      const src = mctx.getImageData(0, 0, w, hh).data;
      const out = document.createElement('canvas');
      out.width = w;
      out.height = hh;
      const octx = out.getContext('2d');
      const m = octx.createImageData(w, hh);
      let painted = 0;
      for (let i = 0; i < src.length; i += 4) {
        const a = src[i + 3];
        m.data[i] = m.data[i + 1] = m.data[i + 2] = a;
        m.data[i + 3] = 255;
        if (a) painted++;
      }
      octx.putImageData(m, 0, 0);
      return { url: out.toDataURL('image/png'), painted };
    }

    function invert() {
      if (!img) return;
      const t = document.createElement('canvas');
      t.width = maskCanvas.width;
      t.height = maskCanvas.height;
      const tc = t.getContext('2d');
      tc.fillStyle = MASK_COLOR;
      tc.fillRect(0, 0, t.width, t.height);
      tc.globalCompositeOperation = 'destination-out';
      tc.drawImage(maskCanvas, 0, 0);
      mctx.clearRect(0, 0, t.width, t.height);
      mctx.drawImage(t, 0, 0);
    }

    function apply(p) {
      if (p.prompt != null) $('fill-prompt').value = p.prompt;
      if (p.steps) $('fill-steps').value = String(p.steps);
      if (p.guidance) $('fill-guidance').value = String(Number(p.guidance));
      seed.set(p.seed);
    }

    async function run() {
      await guarded(errorBox, async () => {
        if (!img) throw new UserError('choose an image first');
        const body = {
          mode,
          prompt: $('fill-prompt').value,
          steps: numberField($('fill-steps'), 'steps', { min: 1, max: 1000 }),
          guidance: numberField($('fill-guidance'), 'guidance', { min: 0, max: 100, integer: false }),
          image: imageDataUrl(img),
          keep_size: $('fill-keep-size').checked,
        };
        if (body.keep_size && (img.width % 32 || img.height % 32)) {
          throw new UserError(`keep size: the image is ${img.width}×${img.height}; fill needs sides that are multiples of 32`);
        }
        if (mode === 'outpaint') {
          const o = borders();
          if (o.left + o.right + o.up + o.down === 0 && o.zoom <= 1) throw new UserError('outpaint: give a border or a zoom-out above 1');
          body.outpaint = o;
        } else {
          const m = maskPng();
          if (!m.painted) throw new UserError('paint the area to fill on the image first (or upload an image with transparency)');
          body.mask = m.url;
        }
        body.seed = seed.forRun();
        const [w, hh] = outputSize();
        await view.start(body, { width: w, height: hh });
      });
    }

    function init_(i) {
      seed = new Seed('fill-');
      $('fill-steps').value = String(i.defaults.steps);
      $('fill-guidance').value = String(i.defaults.guidance);
      view = new JobView('fill-', $('fill-output'), {
        runBtn: $('fill-run'),
        cancelBtn: $('fill-cancel'),
        errorBox,
        onReuse: apply,
        onFinished: () => gallery.load(),
        again: {
          label: 'Run again on the result',
          run: async (v) => {
            $('fill-file').value = '';
            await load(await resultBlob(v), v.resultName || 'result.png');
          },
        },
      });
      $('fill-file').addEventListener('change', (e) => e.target.files[0] && load(e.target.files[0], e.target.files[0].name));
      acceptDrops(stage, (f) => load(f, f.name));
      for (const b of [$('fill-mode-inpaint'), $('fill-mode-outpaint')]) {
        b.addEventListener('click', () => {
          mode = b.dataset.mode;
          showMode();
        });
      }
      if (!i.modes.includes('outpaint')) $('fill-mode-outpaint').disabled = true;
      for (const k of ['left', 'right', 'up', 'down', 'zoom', 'overlap']) $(`op-${k}`).addEventListener('input', drawOutpaint);
      $('fill-keep-size').addEventListener('change', showMode);
      $('brush-paint').addEventListener('click', () => setErase(false));
      $('brush-erase').addEventListener('click', () => setErase(true));
      $('mask-clear').addEventListener('click', () => mctx && mctx.clearRect(0, 0, maskCanvas.width, maskCanvas.height));
      $('mask-invert').addEventListener('click', invert);
      sizeIn.addEventListener('input', () => ($('brush-size-value').textContent = sizeIn.value));

      maskCanvas.addEventListener('pointerdown', (e) => {
        if (!mctx || e.button !== 0) return;
        e.preventDefault();
        maskCanvas.setPointerCapture(e.pointerId);
        stroke = pos(e);
        dab(stroke, stroke);
      });
      maskCanvas.addEventListener('pointermove', (e) => {
        moveRing(e);
        if (!stroke) return;
        for (const ev of e.getCoalescedEvents ? e.getCoalescedEvents() : [e]) {
          const p = pos(ev);
          dab(stroke, p);
          stroke = p;
        }
      });
      const up = () => (stroke = null);
      maskCanvas.addEventListener('pointerup', up);
      maskCanvas.addEventListener('pointercancel', up);
      maskCanvas.addEventListener('pointerleave', () => (ring.hidden = true));
      document.addEventListener('keydown', (e) => {
        if (currentTab !== 'fill' || e.ctrlKey || e.metaKey || e.altKey || /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName)) return;
        if (e.key === 'b') setErase(false);
        else if (e.key === 'e') setErase(true);
        else if (e.key === '[' || e.key === ']') {
          sizeIn.value = String(Number(sizeIn.value) + (e.key === ']' ? 8 : -8));
          $('brush-size-value').textContent = sizeIn.value;
        }
      });
      new ResizeObserver(layout).observe(stage);
      form.addEventListener('submit', (e) => {
        e.preventDefault();
        run();
      });
      submitOnCtrlEnter($('fill-prompt'), form);
      drawOutpaint();
    }

    return { init: init_, apply, layout, load };
  })();

  // ---------------------------------------------------------------- Edit

  const edit = (() => {
    const errorBox = $('edit-error');
    const form = $('edit-form');
    let img = null;
    let seed;
    let view;

    /** The output size the server will pick, about: for the empty frame only. */
    function outputSize() {
      const ar = $('edit-aspect').value;
      let r = img ? img.width / img.height : 1;
      if (ar) {
        const [a, b] = ar.split(':').map(Number);
        r = a / b;
      }
      const area = 1024 * 1024;
      return [Math.floor(Math.round(Math.sqrt(area * r)) / 16) * 16, Math.floor(Math.round(Math.sqrt(area / r)) / 16) * 16];
    }

    async function load(blob, name) {
      await guarded(errorBox, async () => {
        img = await readImage(blob, name);
        const el = $('edit-input');
        el.src = img.canvas.toDataURL('image/jpeg', 0.9);
        el.hidden = false;
        $('edit-empty').hidden = true;
        $('edit-input-info').textContent = describeImage(img);
        if (view) view.frame(...outputSize());
      });
    }

    function apply(p) {
      if (p.prompt != null) $('edit-prompt').value = p.prompt;
      if (p.steps) $('edit-steps').value = String(p.steps);
      if (p.guidance) $('edit-guidance').value = String(Number(p.guidance));
      const sel = $('edit-aspect');
      sel.value = [...sel.options].some((o) => o.value === p.aspect_ratio) ? p.aspect_ratio : '';
      seed.set(p.seed);
    }

    async function run() {
      await guarded(errorBox, async () => {
        if (!img) throw new UserError('choose an image to edit first');
        const body = {
          mode: 'edit',
          prompt: $('edit-prompt').value,
          steps: numberField($('edit-steps'), 'steps', { min: 1, max: 1000 }),
          guidance: numberField($('edit-guidance'), 'guidance', { min: 0, max: 100, integer: false }),
          image: imageDataUrl(img),
        };
        const ar = $('edit-aspect').value;
        if (ar) body.aspect_ratio = ar;
        body.seed = seed.forRun();
        const [w, hh] = outputSize();
        await view.start(body, { width: w, height: hh });
      });
    }

    function init_(i) {
      seed = new Seed('edit-');
      $('edit-steps').value = String(i.defaults.steps);
      $('edit-guidance').value = String(i.defaults.guidance);
      view = new JobView('edit-', $('edit-output'), {
        runBtn: $('edit-run'),
        cancelBtn: $('edit-cancel'),
        errorBox,
        onReuse: apply,
        onFinished: () => gallery.load(),
        again: {
          label: 'Edit the result further',
          run: async (v) => {
            $('edit-file').value = '';
            await load(await resultBlob(v), v.resultName || 'result.png');
          },
        },
      });
      $('edit-file').addEventListener('change', (e) => e.target.files[0] && load(e.target.files[0], e.target.files[0].name));
      $('edit-aspect').addEventListener('change', () => view.frame(...outputSize()));
      acceptDrops($('edit-stage'), (f) => load(f, f.name));
      form.addEventListener('submit', (e) => {
        e.preventDefault();
        run();
      });
      submitOnCtrlEnter($('edit-prompt'), form);
    }

    return { init: init_, apply, load };
  })();

  // Ctrl+V of an image: the input of the tab on show.
  document.addEventListener('paste', (e) => {
    const f = [...(e.clipboardData ? e.clipboardData.files : [])].find((x) => x.type.startsWith('image/'));
    if (!f) return;
    if (currentTab === 'fill') fill.load(f, 'pasted image');
    else if (currentTab === 'edit') edit.load(f, 'pasted image');
    else if (currentTab === 'generate') generate.setInit(f, 'pasted image');
    else return;
    e.preventDefault();
  });

  // ---------------------------------------------------------------- Plan

  const plan = (() => {
    const errorBox = $('plan-error');
    let seq = 0;
    const self = {
      loaded: false,
      init(i) {
        $('plan-width').value = String(i.defaults.width);
        $('plan-height').value = String(i.defaults.height);
        $('plan-steps').value = String(i.defaults.steps);
        $('plan-width').max = $('plan-height').max = String(i.max_side);
        $('plan-budget').placeholder = i.budget ? `server's: ${fmtBytes(i.budget)}` : "server's: none";
        if (!i.modes.includes('generate')) {
          // Fill, edit and control always take an image.
          $('plan-image').checked = true;
          $('plan-image').disabled = true;
          $('plan-image').parentElement.title = `${i.variant} always takes an input image`;
        }
        const again = debounce(() => self.run(), 300);
        for (const id of ['plan-budget', 'plan-width', 'plan-height', 'plan-steps']) $(id).addEventListener('input', again);
        $('plan-image').addEventListener('change', () => self.run());
        $('plan-form').addEventListener('submit', (e) => {
          e.preventDefault();
          self.run();
        });
      },
      async run() {
        self.loaded = true;
        const s = ++seq;
        const q = new URLSearchParams();
        for (const [k, id] of [['width', 'plan-width'], ['height', 'plan-height'], ['steps', 'plan-steps']]) {
          const v = $(id).value.trim();
          if (v) q.set(k, v);
        }
        q.set('image_input', String($('plan-image').checked));
        const budget = $('plan-budget').value.trim();
        if (budget) q.set('vram', budget);
        $('plan-summary').classList.add('busy');
        try {
          const r = await api(`/v1/plan?${q}`);
          if (s !== seq) return;
          hideError(errorBox);
          const p = r.plan;
          const head = `${r.width}×${r.height}, ${r.steps} steps, budget ${r.budget ? fmtBytes(r.budget) : 'none'}: `;
          $('plan-summary').replaceChildren(
            head,
            p
              ? h('span', {}, 'plan ', h('b', {}, p.label), ` · peak ${fmtBytes(p.peak)} · ${fmtSecs(p.time_s)}`, h('span', { class: 'mono muted' }, `  ${p.spec}`))
              : h('b', { class: 'bad' }, 'no plan fits'),
          );
          $('plan-text').textContent = r.text;
          // The chart is the server's own SVG.
          $('plan-svg').innerHTML = r.svg;
        } catch (e) {
          if (s === seq) showError(errorBox, e.message);
        } finally {
          if (s === seq) $('plan-summary').classList.remove('busy');
        }
      },
    };
    return self;
  })();

  // ---------------------------------------------------------------- Gallery

  const gallery = (() => {
    const errorBox = $('gallery-error');
    const grid = $('gallery');
    const dialog = $('gallery-dialog');
    let items = [];
    let open = -1;
    let seq = 0;
    const nodes = new Map();
    const observer = new IntersectionObserver((entries) => {
      for (const en of entries) {
        if (!en.isIntersecting) continue;
        observer.unobserve(en.target);
        const imgEl = en.target.querySelector('img');
        imageUrl(en.target.dataset.url).then((u) => (imgEl.src = u), () => imgEl.classList.add('broken'));
      }
    }, { rootMargin: '300px' });

    /** The mode an image was made in, from its parameters (none for text to image). */
    function modeOf(p) {
      if (p.mode) return p.mode;
      if (p.fill_mask) return 'fill';
      if (p.edit_image_size) return 'edit';
      if (p.control) return 'control';
      if (p.init_image) return 'img2img';
      return null;
    }

    function node(it, index) {
      let n = nodes.get(it.name);
      const p = it.params || {};
      if (!n) {
        n = h('button', { type: 'button', class: 'gallery-item', dataset: { name: it.name, url: it.url } },
          h('img', { alt: p.prompt || it.name, loading: 'lazy' }),
          h('span', { class: 'cap' }, p.prompt || '(no prompt)'),
          h('span', { class: 'meta' }, [p.width && `${p.width}×${p.height}`, p.seed && `seed ${p.seed}`, modeOf(p)].filter(Boolean).join(' · ')));
        nodes.set(it.name, n);
        observer.observe(n);
      }
      n.onclick = () => show(index);
      n.title = p.prompt || it.name;
      return n;
    }

    async function show(i) {
      if (i < 0 || i >= items.length) return;
      open = i;
      const it = items[i];
      $('gallery-name').textContent = it.name;
      renderParams($('gallery-params'), it.params || {}, { 'file size': fmtBytes(it.bytes) });
      $('gallery-prev').disabled = i === 0;
      $('gallery-next').disabled = i === items.length - 1;
      const im = $('gallery-image');
      im.removeAttribute('src');
      im.alt = (it.params && it.params.prompt) || it.name;
      if (!dialog.open) dialog.showModal();
      try {
        const u = await imageUrl(it.url);
        if (open !== i) return;
        im.src = u;
        $('gallery-download').href = u;
        $('gallery-download').download = it.name;
      } catch (e) {
        showError(errorBox, e.message);
      }
    }

    function use() {
      const it = items[open];
      if (!it) return;
      const p = it.params || {};
      const target = p.fill_mask && tabRunnable.fill ? 'fill'
        : p.edit_image_size && tabRunnable.edit ? 'edit'
          : tabRunnable.generate ? 'generate'
            : JOB_TABS.find((t) => tabRunnable[t]);
      dialog.close();
      if (!target) return;
      ({ generate, fill, edit })[target].apply(p);
      showTab(target);
    }

    $('gallery-close').addEventListener('click', () => dialog.close());
    $('gallery-prev').addEventListener('click', () => show(open - 1));
    $('gallery-next').addEventListener('click', () => show(open + 1));
    $('gallery-use').addEventListener('click', use);
    $('gallery-refresh').addEventListener('click', () => self.load());
    dialog.addEventListener('click', (e) => e.target === dialog && dialog.close());
    dialog.addEventListener('keydown', (e) => {
      if (e.key === 'ArrowLeft') show(open - 1);
      else if (e.key === 'ArrowRight') show(open + 1);
    });

    const self = {
      loaded: false,
      async load() {
        self.loaded = true;
        const s = ++seq;
        try {
          const r = await api('/v1/images?limit=200');
          if (s !== seq) return;
          hideError(errorBox);
          items = r.images || [];
          grid.replaceChildren(...items.map(node));
          if (!items.length) grid.append(h('div', { class: 'empty-note' }, 'No images yet: what the server writes shows here.'));
          $('gallery-count').textContent = `${items.length} image${items.length === 1 ? '' : 's'}, newest first`;
          grid.dataset.count = String(items.length);
        } catch (e) {
          if (s === seq) showError(errorBox, e.message);
        } finally {
          if (s === seq) $('plan-summary').classList.remove('busy');
        }
      },
    };
    return self;
  })();

  loadInfo();
})();
