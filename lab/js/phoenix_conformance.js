// Drives the dev portal with the official Phoenix JavaScript client (npm `phoenix`, `ws` as transport) and prints
// one JSON line with what it observed. The Python test decides pass/fail; this script only reports, so a portal bug
// shows up as a wrong field, not as a crash here.
//
// usage: node phoenix_conformance.js '{"endpoint": "ws://127.0.0.1:PORT/gateway/v2", "auth": "header"|"query"|"subprotocol",
//                                      "vsn": "1.0.0"|"2.0.0", "token": "...", "params": {...}, "headers": {...}}'
"use strict"

const { Socket } = require("phoenix")
const WebSocket = require("ws")

const options = JSON.parse(process.argv[2])
const HEARTBEAT_MS = options.heartbeatMs || 150
const WANTED_HEARTBEAT_REPLIES = 3
const DEADLINE_MS = options.deadlineMs || 8000

const report = {
  opened: false,
  socketErrors: [],
  join: null,
  joinError: null,
  init: null,
  pushReplies: {},
  heartbeatReplies: 0,
  unmatchedJoin: null,
  frames: 0,
}

// phoenix constructs the transport with (url, protocols); `ws` takes the upgrade headers as its third argument.
function transportWithHeaders(headers) {
  return class extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols, { headers })
    }
  }
}

const headers = Object.assign({}, options.headers || {})
const params = Object.assign({}, options.params || {})
const socketOptions = {
  heartbeatIntervalMs: HEARTBEAT_MS,
  timeout: 3000,
  reconnectAfterMs: () => 60000,
  rejoinAfterMs: () => 60000,
  vsn: options.vsn || "2.0.0",
}
if (options.auth === "header") headers["X-Authorization"] = `Bearer ${options.token}`
if (options.auth === "query") params.token = options.token
if (options.auth === "subprotocol") socketOptions.authToken = options.token
socketOptions.params = params
socketOptions.transport = transportWithHeaders(headers)
if (socketOptions.vsn.startsWith("1.")) {
  // Phoenix's V1 JSON object form, the one Firezone gateways speak.
  socketOptions.encode = (msg, callback) =>
    callback(JSON.stringify({ topic: msg.topic, event: msg.event, payload: msg.payload, ref: msg.ref, join_ref: msg.join_ref }))
  socketOptions.decode = (raw, callback) => callback(JSON.parse(raw))
}

const socket = new Socket(options.endpoint, socketOptions)
let finished = false

function finish(code) {
  if (finished) return
  finished = true
  process.stdout.write(JSON.stringify(report) + "\n")
  socket.disconnect(() => process.exit(code), 1000, "done")
  setTimeout(() => process.exit(code), 500)
}

setTimeout(() => finish(0), DEADLINE_MS)

socket.onOpen(() => { report.opened = true })
socket.onError((error) => {
  report.socketErrors.push(String((error && error.message) || (error && error.type) || error))
  if (!report.opened) finish(0)
})
socket.onMessage((msg) => {
  report.frames += 1
  if (msg.topic === "phoenix" && msg.event === "phx_reply" && msg.payload && msg.payload.status === "ok") {
    report.heartbeatReplies += 1
    maybeDone()
  }
})

function maybeDone() {
  const allReplies = ["set_snownet_capabilities", "no_such_event"].every((e) => e in report.pushReplies)
  if (report.init && allReplies && report.unmatchedJoin && report.heartbeatReplies >= WANTED_HEARTBEAT_REPLIES) {
    finish(0)
  }
}

function recordReply(event) {
  return (status) => (response) => {
    report.pushReplies[event] = { status, response }
    maybeDone()
  }
}

const channel = socket.channel("gateway", null)
channel.on("init", (payload) => {
  report.init = payload
  for (const event of ["set_snownet_capabilities", "no_such_event"]) {
    const payload = event === "set_snownet_capabilities" ? { iceless: false } : { hello: "portal" }
    const reply = recordReply(event)
    channel.push(event, payload, 3000).receive("ok", reply("ok")).receive("error", reply("error")).receive("timeout", reply("timeout"))
  }
  maybeDone()
})
channel
  .join(3000)
  .receive("ok", (response) => { report.join = response })
  .receive("error", (response) => { report.joinError = response; finish(0) })
  .receive("timeout", () => { report.joinError = "timeout"; finish(0) })

const stranger = socket.channel("room:lobby", {})
stranger
  .join(3000)
  .receive("ok", (response) => { report.unmatchedJoin = { status: "ok", response }; stranger.leave() })
  .receive("error", (response) => { report.unmatchedJoin = { status: "error", response }; stranger.leave(); maybeDone() })
  .receive("timeout", () => { report.unmatchedJoin = { status: "timeout" } })

socket.connect()
