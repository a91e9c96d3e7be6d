"use strict";

// Everything the page measured, in one object: for debugging in the console and for the browser test.
const playground = { connection: "new", ice: "new", state: "idle", session: null, turns: {}, errors: [] };
window.playground = playground;

const $ = (id) => document.getElementById(id);
const METER_MS = 50;
let pc = null;
let audioCtx = null;
let micStream = null;
let meterTimer = null;
let micMeter = null;
let agentMeter = null;
let playingTurn = null; // the reply whose audio the agent meter is hearing

$("start").addEventListener("click", () => (pc ? hangUp() : start().catch(fail)));
showPageInfo();

// What to know before the first click: the server's notice (the tiny model speaks noise), and whether this page
// may use the microphone at all (browsers allow it only on https pages and on localhost).
async function showPageInfo() {
  const port = location.port || (location.protocol === "https:" ? "443" : "80");
  for (const el of document.querySelectorAll(".port")) el.textContent = port;
  $("insecure").hidden = window.isSecureContext;
  try {
    const res = await fetch("info");
    const info = await res.json();
    if (info.notice) showNotice(info.notice);
  } catch (err) {
    playground.errors.push(`info: ${err.message || err}`);
  }
}

function showNotice(text) {
  $("notice").textContent = text;
  $("notice").hidden = false;
}

async function start() {
  if (!navigator.mediaDevices) {
    throw new Error("this browser gives no microphone to this page: open it on localhost (SSH tunnel, see above) or over https");
  }
  $("start").disabled = true;
  setState("connecting");
  micStream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  audioCtx = new AudioContext();
  micMeter = analyser(micStream);
  pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver(micStream.getAudioTracks()[0], { direction: "sendrecv", streams: [micStream] });
  const channel = pc.createDataChannel("events");
  channel.onmessage = (e) => onEvent(JSON.parse(e.data));
  pc.ontrack = (e) => onAgentTrack(e.track);
  pc.oniceconnectionstatechange = () => showConnection();
  pc.onconnectionstatechange = () => {
    showConnection();
    if (pc && (pc.connectionState === "failed" || pc.connectionState === "closed")) hangUp();
  };
  meterTimer = setInterval(measure, METER_MS);

  await pc.setLocalDescription(await pc.createOffer());
  await gatheringDone(pc, 3000); // the server takes no trickled candidates: send them all in the offer
  const res = await fetch("offer", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
  });
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new Error(body.detail || `the server answered ${res.status}`);
  }
  const answer = await res.json();
  playground.session = answer.session;
  await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  $("start").textContent = "Hang up";
  $("start").classList.add("hangup");
  $("start").disabled = false;
}

function hangUp() {
  if (pc) pc.close();
  pc = null;
  clearInterval(meterTimer);
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (audioCtx) audioCtx.close();
  audioCtx = micMeter = agentMeter = null;
  $("mic-level").style.width = $("agent-level").style.width = "0";
  $("start").textContent = "Start talking";
  $("start").classList.remove("hangup");
  $("start").disabled = false;
  setState("idle");
  showConnection();
}

function fail(err) {
  playground.errors.push(String(err.message || err));
  addItem("error").textContent = `Could not connect: ${err.message || err}`;
  hangUp();
}

function gatheringDone(peer, timeoutMs) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, timeoutMs);
    peer.addEventListener("icegatheringstatechange", () => {
      if (peer.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

function onAgentTrack(track) {
  const stream = new MediaStream([track]);
  // Chrome feeds a remote track to WebAudio only while a media element plays it too; it is also what you hear.
  const audio = $("agent-audio");
  audio.srcObject = stream;
  audio.play().catch(() => {});
  agentMeter = analyser(stream);
}

// --- events from the agent ------------------------------------------------------------------------------

function onEvent(msg) {
  const turn = msg.turn === undefined ? null : turnOf(msg.turn);
  switch (msg.type) {
    case "hello":
      if (msg.notice) showNotice(msg.notice);
      break;
    case "state":
      setState(msg.state);
      break;
    case "vad":
      $("vad").classList.toggle("on", msg.speech);
      break;
    case "user_turn":
      turn.userSeconds = msg.seconds;
      addItem("user").textContent = `You spoke for ${msg.seconds.toFixed(1)} s`;
      turn.item = addItem("agent");
      turn.item.innerHTML = '<div class="text"></div><div class="meta"></div>';
      break;
    case "transcript":
      turn.text += msg.text;
      showTurn(turn);
      break;
    case "first_audio":
      turn.firstAudioMs = msg.ms;
      playingTurn = turn;
      showTurn(turn);
      break;
    case "barge_in":
      turn.heardMs = msg.heard_ms;
      if (msg.text !== undefined) turn.text = msg.text; // the context keeps only what was heard
      showTurn(turn);
      break;
    case "turn_done":
      // The final text is what the listener heard: shorter than the streamed text after an interruption.
      Object.assign(turn, { text: msg.text, ttfaMs: msg.ttfa_ms, audioMs: msg.audio_ms, reason: msg.reason });
      showTurn(turn);
      break;
    case "error":
      playground.errors.push(msg.message);
      addItem("error").textContent = msg.message;
      break;
  }
}

function turnOf(n) {
  if (!playground.turns[n]) {
    playground.turns[n] = { turn: n, text: "", firstAudioMs: null, ttfaMs: null, peakRms: 0, item: null };
  }
  return playground.turns[n];
}

function showTurn(turn) {
  if (!turn.item) return;
  turn.item.querySelector(".text").textContent = turn.text;
  const parts = [];
  if (turn.firstAudioMs !== null) {
    parts.push(`time to first audio <b>${turn.firstAudioMs} ms</b>`);
  }
  if (turn.ttfaMs !== null && turn.ttfaMs !== undefined) parts.push(`engine ${turn.ttfaMs} ms`);
  if (turn.heardMs !== undefined) parts.push(`interrupted after ${(turn.heardMs / 1000).toFixed(1)} s`);
  else if (turn.audioMs !== undefined) parts.push(`${(turn.audioMs / 1000).toFixed(1)} s of audio`);
  const meta = turn.item.querySelector(".meta");
  meta.innerHTML = parts.join(" &middot; ");
  meta.title = "From the end of your turn (after the pause) to the first reply audio leaving the engine; "
    + "'engine' counts from the reply's start.";
}

// --- view helpers ----------------------------------------------------------------------------------------

function addItem(kind) {
  const list = $("transcript");
  const empty = list.querySelector(".empty");
  if (empty) empty.remove();
  const li = document.createElement("li");
  li.className = kind;
  list.appendChild(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function setState(state) {
  playground.state = state;
  $("state").textContent = state;
  $("state").className = `pill ${state}`;
}

function showConnection() {
  playground.connection = pc ? pc.connectionState : "closed";
  playground.ice = pc ? pc.iceConnectionState : "closed";
  $("connection").textContent = pc ? `connection ${pc.connectionState}` : "not connected";
}

// --- levels ---------------------------------------------------------------------------------------------

function analyser(stream) {
  const node = audioCtx.createAnalyser();
  node.fftSize = 1024;
  audioCtx.createMediaStreamSource(stream).connect(node);
  return { node, buf: new Float32Array(node.fftSize) };
}

function rms(meter) {
  if (!meter) return 0;
  meter.node.getFloatTimeDomainData(meter.buf);
  let sum = 0;
  for (const v of meter.buf) sum += v * v;
  return Math.sqrt(sum / meter.buf.length);
}

function levelWidth(value) {
  const db = 20 * Math.log10(Math.max(value, 1e-5)); // -60 dBFS .. 0 dBFS fills the bar
  return `${Math.min(100, Math.max(0, ((db + 60) / 60) * 100)).toFixed(0)}%`;
}

function measure() {
  const mic = rms(micMeter);
  const agent = rms(agentMeter);
  $("mic-level").style.width = levelWidth(mic);
  $("agent-level").style.width = levelWidth(agent);
  if (playingTurn) playingTurn.peakRms = Math.max(playingTurn.peakRms, agent);
}
