// denoise web app: picks an input (file, drop, paste, URL or sample), posts it to /api/denoise
// with a job id, polls /api/progress/{id}, and shows the result beside the input.
'use strict';

const $ = (id) => document.getElementById(id);

const state = {
  input: null, // { blob, name, fileName, reference }
  inputUrl: null,
  resultUrl: null,
  natural: null, // { w, h } of the image
  zoom: 'fit',
  run: 0, // increases with every run; stale answers are dropped
  abort: null, // cancels the request of a run that a newer one replaced
  busy: false,
  hasResult: false,
  maxUpload: null,
  models: [],
};

function setPageState(s) {
  document.body.dataset.state = s;
}

function showError(message) {
  const el = $('error');
  el.textContent = message;
  el.hidden = false;
  setPageState('error');
}

function clearError() {
  $('error').hidden = true;
  $('error').textContent = '';
}

function formatBytes(n) {
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(n % (1 << 20) ? 1 : 0) + ' MB';
  if (n >= 1 << 10) return Math.round(n / (1 << 10)) + ' KB';
  return n + ' bytes';
}

function randomId() {
  // getRandomValues works outside secure contexts too (a LAN address over http).
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

async function errorText(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error) message = body.error;
  } catch (_) {
    // not JSON: keep the status
  }
  if (response.status === 503) {
    const retry = response.headers.get('Retry-After');
    if (retry && !message.includes('retry in')) message += ` (retry in ${retry} s)`;
  }
  return message;
}

// ---- models, samples, limits ----

async function loadModels() {
  const response = await fetch('/api/models');
  if (!response.ok) throw new Error(await errorText(response));
  const body = await response.json();
  state.models = body.models;
  state.maxUpload = body.limits && body.limits.max_upload_bytes;
  const select = $('model');
  select.replaceChildren();
  for (const m of body.models) {
    const option = document.createElement('option');
    option.value = m.name;
    option.textContent = `${m.name} (${m.kind})`;
    option.selected = m.name === body.default;
    select.append(option);
  }
  if (body.limits) {
    // Pass counts over the server's limit are offered disabled.
    for (const option of $('ensemble').options) {
      option.disabled = Number(option.value) > (body.limits.max_ensemble || 1);
    }
    // A browser may restore a choice the server no longer allows.
    if ($('ensemble').selectedOptions[0]?.disabled) $('ensemble').value = '1';
    const mp = body.limits.max_pixels / 1e6;
    $('limits').textContent =
      `PNG, JPEG, WebP, TIFF or BMP, up to ${formatBytes(body.limits.max_upload_bytes)} and ${mp >= 1 ? Math.round(mp) : mp} MP`;
  }
  describeModel();
}

function describeModel() {
  const m = state.models.find((x) => x.name === $('model').value);
  if (!m) return;
  const parts = [m.kind, m.channels === 1 ? 'gray' : 'colour'];
  if (m.trained_on) parts.push(`trained on ${m.trained_on}`);
  if (m.val_psnr) parts.push(`validation ${m.val_psnr.toFixed(2)} dB`);
  $('model-info').textContent = parts.join(' · ');
  $('strength').disabled = !m.takes_sigma;
  $('strength').title = m.takes_sigma ? '' : 'This model is blind: it takes no noise level.';
}

async function loadSamples() {
  const response = await fetch('/api/samples');
  if (!response.ok) {
    $('samples').textContent = `Samples unavailable: ${await errorText(response)}`;
    return;
  }
  const body = await response.json();
  const list = $('samples');
  list.replaceChildren();
  for (const s of body.samples) {
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'chip';
    button.dataset.sample = s.name;
    button.textContent = s.name;
    const size = document.createElement('small');
    size.textContent = `${s.width}×${s.height}`;
    button.append(size);
    button.addEventListener('click', () => pickSample(s.name));
    list.append(button);
  }
  if (!body.samples.length) list.closest('.samples').hidden = true;
}

// ---- inputs ----

function setInput(blob, name, fileName, reference) {
  if (state.maxUpload && blob.size > state.maxUpload) {
    showError(`${name} is ${formatBytes(blob.size)}, over the limit of ${formatBytes(state.maxUpload)}`);
    return;
  }
  clearError();
  if (state.inputUrl) URL.revokeObjectURL(state.inputUrl);
  state.input = { blob, name, fileName, reference };
  state.inputUrl = URL.createObjectURL(blob);
  state.natural = null;
  clearResult();
  $('input-name').textContent = name;
  $('input-name').title = name;
  $('tag-after').textContent = 'Denoised';
  $('placeholder').hidden = true;
  $('stage').hidden = false;
  $('stage').classList.add('single');
  $('before').src = state.inputUrl;
  $('after').removeAttribute('src');
  $('run').disabled = false;
  run();
}

function clearResult() {
  state.hasResult = false;
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = null;
  const download = $('download');
  download.removeAttribute('href');
  download.setAttribute('aria-disabled', 'true');
  $('split').disabled = true;
  for (const id of ['stat-time', 'stat-sigma', 'stat-size', 'stat-psnr']) $(id).textContent = '–';
}

function pickFile(file) {
  if (!file) return;
  setInput(file, file.name || 'pasted image', file.name || 'upload.png', null);
}

async function pickSample(name) {
  const sigma = $('sample-sigma').value;
  clearError();
  setPageState('loading');
  try {
    const response = await fetch(`/api/samples/${encodeURIComponent(name)}?sigma=${sigma}`);
    if (!response.ok) throw new Error(await errorText(response));
    const blob = await response.blob();
    setInput(blob, `${name} + noise σ ${sigma}`, `${name}-noisy.png`, name);
  } catch (e) {
    showError(`Cannot load the sample: ${e.message}`);
  }
}

async function pickUrl(url) {
  url = url.trim();
  if (!url) return;
  clearError();
  setPageState('loading');
  const button = $('url-form').querySelector('button');
  button.disabled = true;
  button.textContent = 'Fetching…';
  try {
    const response = await fetch('/api/fetch-url', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ url }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const blob = await response.blob();
    let name = url;
    try {
      const last = new URL(url).pathname.split('/').filter(Boolean).pop();
      if (last) name = decodeURIComponent(last);
    } catch (_) {
      // keep the URL as the name
    }
    setInput(blob, name, 'fetched.png', null);
  } catch (e) {
    showError(e.message);
  } finally {
    button.disabled = false;
    button.textContent = 'Fetch';
  }
}

// ---- denoising ----

function progressUi(text, fraction) {
  $('progress').hidden = false;
  $('progress-text').textContent = text;
  const fill = $('progress-fill');
  const bar = $('progress-bar');
  if (fraction == null) {
    fill.classList.add('indeterminate');
    fill.style.width = '';
    bar.removeAttribute('aria-valuenow');
  } else {
    fill.classList.remove('indeterminate');
    fill.style.width = `${Math.round(fraction * 100)}%`;
    bar.setAttribute('aria-valuenow', String(Math.round(fraction * 100)));
  }
}

function pollProgress(job, runId) {
  let stopped = false;
  const tick = async () => {
    if (stopped || runId !== state.run) return;
    try {
      const response = await fetch(`/api/progress/${job}`);
      if (response.ok && !stopped) {
        const p = await response.json();
        if (p.state === 'queued') progressUi('Waiting for a worker…', null);
        else if (p.state === 'running' && p.total > 1) {
          const unit = Number($('ensemble').value) > 1 ? 'pass' : 'tile';
          progressUi(`Denoising… ${unit} ${p.done} of ${p.total}`, p.done / p.total);
          document.body.dataset.tiles = `${p.done}/${p.total}`;
        }
        else if (p.state === 'running') progressUi('Denoising…', null);
      }
    } catch (_) {
      // a missed poll is harmless
    }
    if (!stopped) setTimeout(tick, 250);
  };
  setTimeout(tick, 150);
  return () => {
    stopped = true;
  };
}

async function run() {
  if (!state.input) return;
  const runId = ++state.run;
  const input = state.input;
  clearError();
  $('hint').hidden = true;
  setBusy(true);
  setPageState('running');
  progressUi('Uploading…', null);
  const job = randomId();
  delete document.body.dataset.tiles;
  const form = new FormData();
  form.append('model', $('model').value);
  const fixed = document.querySelector('input[name="mode"]:checked').value === 'fixed';
  form.append('sigma', fixed ? $('sigma-num').value || $('sigma').value : 'blind');
  form.append('ensemble', $('ensemble').value);
  if (input.reference) form.append('reference', input.reference);
  form.append('job', job);
  form.append('image', input.blob, input.fileName);
  const stop = pollProgress(job, runId);
  const started = performance.now();
  // A newer run replaces this one: cancel the older request so it frees its place in the
  // server's queue rather than being computed for nobody.
  if (state.abort) state.abort.abort();
  const abort = new AbortController();
  state.abort = abort;
  try {
    const response = await fetch('/api/denoise', {
      method: 'POST',
      body: form,
      signal: abort.signal,
    });
    if (runId !== state.run) return;
    if (!response.ok) throw new Error(await errorText(response));
    const blob = await response.blob();
    if (runId !== state.run) return;
    showResult(blob, response.headers, performance.now() - started, fixed, input);
  } catch (e) {
    if (runId === state.run) showError(`Denoising failed: ${e.message}`);
  } finally {
    stop();
    if (runId === state.run) {
      setBusy(false);
      $('progress').hidden = true;
    }
  }
}

function setBusy(busy) {
  state.busy = busy;
  $('run').disabled = busy || !state.input;
  $('run').textContent = busy ? 'Denoising…' : state.hasResult ? 'Denoise again' : 'Denoise';
}

function showResult(blob, headers, roundTripMs, fixed, input) {
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(blob);
  state.hasResult = true;
  const after = $('after');
  after.onload = () => {
    if (!state.natural) state.natural = { w: after.naturalWidth, h: after.naturalHeight };
    layout();
    setPageState('done');
  };
  after.src = state.resultUrl;
  $('stage').classList.remove('single');
  $('split').disabled = false;
  setSplit(50);
  const download = $('download');
  download.href = state.resultUrl;
  const base = (input.fileName || 'image').replace(/\.[^.]+$/, '');
  download.download = `${base}-denoised.png`;
  download.setAttribute('aria-disabled', 'false');

  const ms = Number(headers.get('X-Denoise-Ms'));
  $('stat-time').textContent = `${ms.toLocaleString()} ms`;
  $('stat-time').title = `server ${ms} ms, round trip ${Math.round(roundTripMs)} ms`;
  const sigma = headers.get('X-Denoise-Sigma');
  const range = headers.get('X-Denoise-Sigma-Range');
  const byModel = headers.get('X-Denoise-Sigma-Source') === 'model';
  $('stat-sigma').textContent = sigma
    ? `${range && !fixed ? range.replace('-', '–') : sigma}${fixed ? '' : ' (est.)'}`
    : 'n/a (blind model)';
  $('stat-sigma').title = !sigma || fixed
    ? ''
    : byModel
      ? `read by the model's own estimator, from ${range ? range.replace('-', ' to ') : sigma} across the image; root mean square ${sigma}`
      : range
      ? `estimated from the image, by brightness (patch covariance per brightness group, Chen et al. 2015); root mean square ${sigma}`
      : 'estimated from the image';
  // Blind white noise that the model gave to its white-noise network.
  const white = !fixed && headers.get('X-Denoise-Network') === 'white-noise';
  $('hint').textContent = white
    ? 'This noise is white (independent from pixel to pixel and across colours, as synthetic noise is): the white-noise network denoised it.'
    : '';
  $('hint').hidden = !white;
  $('stat-size').textContent = (headers.get('X-Denoise-Size') || '').replace('x', ' × ');
  const psnr = headers.get('X-Denoise-Psnr');
  const psnrIn = headers.get('X-Denoise-Psnr-Input');
  const cell = $('stat-psnr');
  cell.replaceChildren();
  if (psnr && psnrIn) {
    const gain = Number(psnr) - Number(psnrIn);
    cell.append(`${psnrIn} → ${psnr} dB `);
    const span = document.createElement('span');
    span.className = 'gain';
    span.textContent = `(${gain >= 0 ? '+' : ''}${gain.toFixed(2)})`;
    cell.append(span);
  } else {
    cell.textContent = 'samples only';
    cell.title = 'PSNR needs the clean image: pick a sample to see it.';
  }
  setBusy(false);
  // On a phone the viewer sits below the controls: bring the result into view.
  const viewer = document.querySelector('.viewer');
  if (viewer.getBoundingClientRect().top > window.innerHeight * 0.6) {
    viewer.scrollIntoView({ behavior: 'smooth', block: 'start' });
  }
}

// ---- viewer ----

function setSplit(percent) {
  const p = Math.min(100, Math.max(0, percent));
  $('stage').style.setProperty('--split', `${p}%`);
  $('split').value = p;
}

function layout() {
  const n = state.natural;
  if (!n) return;
  const viewport = $('viewport');
  const stage = $('stage');
  let scale;
  if (state.zoom === 'fit') {
    // Leave room for the header, toolbar and numbers, so the whole result shows at once.
    const maxH = Math.max(220, Math.min(window.innerHeight - 300, 900));
    scale = Math.min(viewport.clientWidth / n.w, maxH / n.h);
  } else {
    // One image pixel per device pixel.
    scale = 1 / (window.devicePixelRatio || 1);
  }
  stage.style.width = `${Math.max(1, Math.round(n.w * scale))}px`;
  stage.style.height = `${Math.max(1, Math.round(n.h * scale))}px`;
}

function setZoom(zoom) {
  state.zoom = zoom;
  $('viewport').classList.toggle('fit', zoom === 'fit');
  $('viewport').classList.toggle('actual', zoom !== 'fit');
  for (const [id, z] of [['zoom-fit', 'fit'], ['zoom-1', 'actual']]) {
    $(id).classList.toggle('active', zoom === z);
    $(id).setAttribute('aria-pressed', String(zoom === z));
  }
  layout();
}

function wireViewer() {
  const stage = $('stage');
  let dragging = false;
  const fromEvent = (e) => {
    const rect = stage.getBoundingClientRect();
    setSplit(((e.clientX - rect.left) / rect.width) * 100);
  };
  stage.addEventListener('pointerdown', (e) => {
    if (!state.hasResult) return;
    // At 100% a touch pans the image; the slider below still moves the split.
    if (state.zoom !== 'fit' && e.pointerType !== 'mouse') return;
    dragging = true;
    stage.setPointerCapture(e.pointerId);
    fromEvent(e);
    e.preventDefault();
  });
  stage.addEventListener('pointermove', (e) => dragging && fromEvent(e));
  const end = () => {
    dragging = false;
  };
  stage.addEventListener('pointerup', end);
  stage.addEventListener('pointercancel', end);
  $('split').addEventListener('input', (e) => setSplit(Number(e.target.value)));
  $('before').addEventListener('load', () => {
    const before = $('before');
    state.natural = { w: before.naturalWidth, h: before.naturalHeight };
    layout();
  });
  $('before').addEventListener('error', () => {
    // TIFF and some other formats do not display in browsers: show the result alone.
    if (state.input) $('tag-after').textContent = 'Denoised (no preview of the original)';
  });
  $('zoom-fit').addEventListener('click', () => setZoom('fit'));
  $('zoom-1').addEventListener('click', () => setZoom('actual'));
  window.addEventListener('resize', layout);
}

// ---- wiring ----

function wireInputs() {
  $('file').addEventListener('change', (e) => {
    pickFile(e.target.files[0]);
    e.target.value = '';
  });
  const drop = $('drop');
  let depth = 0;
  document.addEventListener('dragenter', (e) => {
    if (!e.dataTransfer || !Array.from(e.dataTransfer.types).includes('Files')) return;
    depth += 1;
    drop.classList.add('over');
  });
  document.addEventListener('dragleave', () => {
    depth = Math.max(0, depth - 1);
    if (!depth) drop.classList.remove('over');
  });
  document.addEventListener('dragover', (e) => e.preventDefault());
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    depth = 0;
    drop.classList.remove('over');
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) pickFile(file);
  });
  document.addEventListener('paste', (e) => {
    const item = Array.from((e.clipboardData && e.clipboardData.files) || []).find((f) => f.type.startsWith('image/'));
    if (item) pickFile(item);
  });
  $('url-form').addEventListener('submit', (e) => {
    e.preventDefault();
    pickUrl($('url').value);
  });
  $('model').addEventListener('change', describeModel);
  // The slider covers the usual range (0-75); the number box takes all the API does (0-255).
  const sigma = $('sigma');
  const sigmaNum = $('sigma-num');
  const chooseFixed = () => {
    document.querySelector('input[name="mode"][value="fixed"]').checked = true;
  };
  sigma.addEventListener('input', () => {
    sigmaNum.value = sigma.value;
    chooseFixed();
  });
  sigmaNum.addEventListener('input', () => {
    const v = Number(sigmaNum.value);
    if (sigmaNum.value === '' || !Number.isFinite(v)) return;
    sigmaNum.value = String(Math.min(255, Math.max(0, Math.round(v))));
    sigma.value = sigmaNum.value;
    chooseFixed();
  });
  $('run').addEventListener('click', run);
}

async function init() {
  wireInputs();
  wireViewer();
  setPageState('loading');
  try {
    await Promise.all([loadModels(), loadSamples()]);
    setPageState('ready');
  } catch (e) {
    showError(`Cannot reach the server: ${e.message}`);
  }
}

init();
