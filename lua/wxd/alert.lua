--- wxd.alert: structured alerts to a WeCom (企业微信) group robot, one per
-- key and window, that never make a request wait.
--
-- `alert.send{ key, title, text, fields }` only adds to a count in this
-- worker's memory. Each worker's timer then folds its counts into the
-- store (wxd.store: a shared dictionary, or Redis when the nodes share
-- one), and the first worker whose timer finds a key's events `wait`
-- seconds old and wins the key's window (an add-if-absent with a TTL of
-- `window` seconds) takes the key's whole count and queues one markdown
-- message. Events that come later in the window are counted and folded
-- into the key's next alert, sent once the window has passed. Another
-- timer posts the queue to the robot's webhook, one message at a time,
-- within a `timeout`, at most `rate` messages per `rate_period` seconds
-- per robot (a sliding log in the store, so across workers and nodes).
-- A full queue or too many distinct keys drop alerts; every outcome counts
-- in wxd_alerts_total{outcome}.
--
-- Config (config.lua):
--
--     alert = {
--       webhook = env("WXD_ALERT_WEBHOOK"), -- https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=...
--       window = 60, wait = 10, on_breaker_open = true, on_upstream_failure = true,
--     }
--
-- The full contract is docs/alerts.md.
-- @module wxd.alert
-- @usage
-- local alert = require "wxd.alert"
-- alert.send{ key = "pay:refund", title = "refund failed", text = err,
--             fields = { url = url, errcode = code } }

local wxd = require "wxd"
local json = require "wxd.json"
local crypto = require "wxd.crypto"
local timer = require "wxd.timer"
local log = require "wxd.log"
local metrics = require "wxd.metrics"
local trace = require "wxd.trace"
local retry = require "wxd.retry"
local http = require "wxd.http"
local store = require "wxd.store"

local type, pairs, ipairs, tostring, tonumber, error, pcall, select =
  type, pairs, ipairs, tostring, tonumber, error, pcall, select
local concat, sort = table.concat, table.sort
local match, sub, gsub, byte, format, gmatch =
  string.match, string.sub, string.gsub, string.byte, string.format, string.gmatch
local floor, max = math.floor, math.max
local monotonic_ms = wxd.monotonic_ms

local _M = {}

-- WeCom's limits: a markdown content of at most 4096 bytes of UTF-8, and
-- 20 messages a minute per robot.
_M.MAX_CONTENT = 4096

local KEYS = { webhook = true, window = true, wait = true, rate = true, rate_period = true, queue = true,
  max_keys = true, timeout = true, interval_ms = true, on_breaker_open = true, on_upstream_failure = true,
  name = true, prefix = true }

local function number(cfg, k, default, lo, hi)
  local v = cfg[k]
  if v == nil then return default end
  if type(v) ~= "number" or not (v >= lo and v <= hi) then
    error(format("config.alert.%s: expected a number in %s..%s, got %s", k, lo, hi, tostring(v)), 0)
  end
  return v
end

local function host_name()
  local f = io.open("/proc/sys/kernel/hostname", "r")
  local h = f and f:read("*l")
  if f then f:close() end
  return h or os.getenv("HOSTNAME") or "wxd"
end

--- Checks config.lua's `alert` section and completes it with the defaults.
-- @treturn ?table settings
-- @treturn ?string error naming the key
function _M.settings(cfg)
  local ok, s = pcall(function()
    if type(cfg) ~= "table" then error("config.alert: expected a table, got " .. type(cfg), 0) end
    for k in pairs(cfg) do
      if not KEYS[k] then error("config.alert." .. tostring(k) .. ": unknown key", 0) end
    end
    local url = cfg.webhook
    if type(url) ~= "string" or not pcall(http.parse_url, url) then
      error("config.alert.webhook: expected the robot's http(s) URL "
        .. "(https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=...)", 0)
    end
    for _, k in ipairs({ "on_breaker_open", "on_upstream_failure" }) do
      if cfg[k] ~= nil and type(cfg[k]) ~= "boolean" then error("config.alert." .. k .. ": expected a boolean", 0) end
    end
    if cfg.name ~= nil and type(cfg.name) ~= "string" then error("config.alert.name: expected a string", 0) end
    if cfg.prefix ~= nil and type(cfg.prefix) ~= "string" then error("config.alert.prefix: expected a string", 0) end
    local s = {
      webhook = url,
      window = number(cfg, "window", 60, 0.01, 86400),
      wait = number(cfg, "wait", 10, 0, 86400),
      rate = floor(number(cfg, "rate", 20, 1, 1000)),
      rate_period = number(cfg, "rate_period", 60, 0.01, 86400),
      queue = floor(number(cfg, "queue", 64, 1, 100000)),
      max_keys = floor(number(cfg, "max_keys", 1000, 1, 1000000)),
      timeout = number(cfg, "timeout", 5, 0.01, 600),
      interval_ms = floor(number(cfg, "interval_ms", 1000, 10, 3600000)),
      on_breaker_open = cfg.on_breaker_open == true,
      on_upstream_failure = cfg.on_upstream_failure == true,
      name = cfg.name or host_name(),
      prefix = cfg.prefix or "wxd:alert:",
    }
    -- Counts nobody sends (every worker that saw them gone) expire.
    s.keep = max(600, s.window * 10 + s.wait)
    -- One rate log per robot: the webhook's key, hashed (it is a secret).
    s.robot = sub(crypto.sha256_hex(url), 1, 16)
    return s
  end)
  if not ok then return nil, tostring(s) end
  return s
end

------------------------------------------------------------------------
-- This worker's state (one per Lua state, so per app generation)
------------------------------------------------------------------------

local S              -- settings once started
local the_store      -- wxd.store of config.lua
local pending, npending = {}, 0  -- key -> { n = count, sample = first event }, not yet in the store
local watched, nwatched = {}, 0  -- keys this worker put counts in and checks each tick
local seen, nseen = {}, 0        -- key -> monotonic ms until which send() says "suppressed"
local queue, qhead, qtail = {}, 1, 0 -- messages waiting for the robot
local stats = { sent = 0, failed = 0, dropped = 0, suppressed = 0, deferred = 0, store_errors = 0 }

local outcome_metric
local function count(outcome, n)
  stats[outcome] = stats[outcome] + (n or 1)
  outcome_metric = outcome_metric or metrics.builtin("counter", "wxd_alerts_total",
    "Alerts by outcome: sent, failed (the robot refused or did not answer), dropped (queue full, too many keys), "
      .. "suppressed (folded into the key's next alert), deferred (waited for the robot's rate limit)", { "outcome" })
  metrics.count(outcome_metric, { outcome }, n or 1)
end

local function skey(kind, key) return S.prefix .. kind .. key end

------------------------------------------------------------------------
-- The message
------------------------------------------------------------------------

-- Valid UTF-8 (wxd.json turns each bad piece into U+FFFD).
local function utf8_clean(s) return json.decode(json.encode(s)) end

--- Cuts `s` to at most `limit` bytes at a character boundary, marking the cut.
function _M.truncate(s, limit)
  limit = limit or _M.MAX_CONTENT
  if #s <= limit then return s end
  local mark = "\n…(truncated)"
  local cut = limit - #mark
  while cut > 0 and (byte(s, cut + 1) or 0) >= 0x80 and byte(s, cut + 1) < 0xC0 do cut = cut - 1 end
  return sub(s, 1, cut) .. mark
end

local function one_line(v, limit)
  local s = gsub(tostring(v), "[\r\n]+", " ")
  if #s > limit then s = _M.truncate(s, limit) end
  return s
end

local function utc(t) return os.date("!%Y-%m-%d %H:%M:%S UTC", floor(t)) end

local FIRST = { "url", "errcode", "status", "error", "trace_id" }
local IS_FIRST = {}
for _, k in ipairs(FIRST) do IS_FIRST[k] = true end

--- The markdown content of an alert: `n` events of `key` since the first
-- one, whose `sample` (title, text, fields, at) is shown.
function _M.content(key, n, sample, source)
  local fields = sample.fields or {}
  local lines = {
    '## <font color="warning">' .. one_line(sample.title or key, 256) .. "</font>",
    "> count: **" .. format("%d", n) .. "** since " .. utc(sample.at or wxd.now()),
    "> key: " .. one_line(key, 256),
  }
  for _, k in ipairs(FIRST) do
    if fields[k] ~= nil then lines[#lines + 1] = "> " .. k .. ": " .. one_line(fields[k], 512) end
  end
  local rest = {}
  for k in pairs(fields) do
    if not IS_FIRST[k] and k ~= "count" then rest[#rest + 1] = k end
  end
  sort(rest)
  for _, k in ipairs(rest) do lines[#lines + 1] = "> " .. one_line(k, 64) .. ": " .. one_line(fields[k], 512) end
  lines[#lines + 1] = "> source: " .. one_line(source or "wxd", 128)
  if sample.text and sample.text ~= "" then
    lines[#lines + 1] = ""
    lines[#lines + 1] = sample.text
  end
  return _M.truncate(utf8_clean(concat(lines, "\n")), _M.MAX_CONTENT)
end

------------------------------------------------------------------------
-- send: the request's side (no store, no network: a table update)
------------------------------------------------------------------------

local function sample_of(a, at)
  local fields = {}
  if a.fields then
    for k, v in pairs(a.fields) do
      local t = type(v)
      if type(k) == "string" and (t == "string" or t == "number" or t == "boolean") then fields[k] = v end
    end
  end
  if fields.trace_id == nil then fields.trace_id = trace.ids() end
  return { at = at, title = a.title, text = a.text, fields = fields }
end

--- Raises an alert (folded with the others of its key and window).
-- @tparam table a `key` (1..200 bytes: what is deduplicated), `title`,
--   `text` (markdown), `fields` (name → string, number or boolean;
--   `count` says how many events this call stands for, default 1;
--   `trace_id` defaults to the running request's)
-- @treturn ?boolean true: the first of its key this worker has seen in
--   the window; false, "suppressed": folded into the key's alert
-- @treturn ?string "suppressed", "not configured", "too many keys" (dropped)
function _M.send(a)
  if type(a) ~= "table" then error("wxd.alert: send needs a table", 2) end
  local key = a.key
  if type(key) ~= "string" or key == "" or #key > 200 then error("wxd.alert: key must be a string of 1..200 bytes", 2) end
  if a.title ~= nil and type(a.title) ~= "string" then error("wxd.alert: title must be a string", 2) end
  if a.text ~= nil and type(a.text) ~= "string" then error("wxd.alert: text must be a string", 2) end
  if a.fields ~= nil and type(a.fields) ~= "table" then error("wxd.alert: fields must be a table", 2) end
  if not S and not _M.start() then return nil, "not configured" end
  local n = a.fields and tonumber(a.fields.count) or 1
  n = n >= 1 and floor(n) or 1
  local p = pending[key]
  if p then
    p.n = p.n + n
  else
    if npending >= S.max_keys then
      count("dropped")
      return nil, "too many keys"
    end
    pending[key] = { n = n, sample = sample_of(a, wxd.now()) }
    npending = npending + 1
  end
  local now = monotonic_ms()
  local until_ms = seen[key]
  if until_ms and until_ms > now then
    count("suppressed")
    return false, "suppressed"
  end
  if not until_ms then
    if nseen >= S.max_keys then return true end -- too many to remember: no harm but a "true"
    nseen = nseen + 1
  end
  seen[key] = now + S.window * 1000
  return true
end

------------------------------------------------------------------------
-- The timers: counts into the store, windows, the queue to the robot
------------------------------------------------------------------------

local store_warned = 0
local function store_error(err)
  stats.store_errors = stats.store_errors + 1
  local now = monotonic_ms()
  if now - store_warned > 10000 then
    store_warned = now
    log.warn("wxd.alert: the store failed; alerts wait", { error = tostring(err) })
  end
end

-- The whole count of a key, taken atomically (compare-and-delete).
local function take(k)
  for _ = 1, 100 do
    local n, err = the_store:get(k)
    if n == nil then
      if err then store_error(err) end
      return 0
    end
    if the_store:cas(k, n, nil) then return tonumber(n) or 0 end
  end
  return 0
end

local function enqueue(key, n, sample)
  if qtail - qhead + 1 >= S.queue then
    count("dropped")
    log.warn("wxd.alert: queue full, alert dropped", { key = key, count = n })
    return
  end
  local body = json.encode({ msgtype = "markdown", markdown = { content = _M.content(key, n, sample, S.name) } })
  qtail = qtail + 1
  queue[qtail] = { key = key, n = n, body = body }
end

local function watch(key)
  if not watched[key] then
    watched[key] = true
    nwatched = nwatched + 1
  end
end

-- The index: every key with a batch not yet sent, in the store, so that a
-- worker of a new generation (a reload) or a new process (a restart) takes
-- over the keys the old one watched. Changed by compare-and-set.
local function index_change(key, add)
  local k = S.prefix .. "keys"
  for _ = 1, 50 do
    local old, err = the_store:get(k)
    if old == nil and err then return store_error(err) end
    local list = type(old) == "string" and json.decode(old) or {}
    if type(list) ~= "table" then list = {} end
    local at
    for i = 1, #list do
      if list[i] == key then at = i break end
    end
    if add then
      if at or #list >= S.max_keys then return end
      list[#list + 1] = key
    else
      if not at then return end
      table.remove(list, at)
    end
    local new = #list > 0 and json.encode(json.array(list)) or nil
    if the_store:cas(k, old, new, new and S.keep or nil) then return end
  end
end

local function unwatch(key)
  if watched[key] then
    watched[key] = nil
    nwatched = nwatched - 1
  end
  index_change(key, false)
end

-- At a worker's first tick: every key of the index is watched.
local seeded = false
local function seed()
  seeded = true
  local idx = the_store:get(S.prefix .. "keys")
  local list = type(idx) == "string" and json.decode(idx)
  if type(list) ~= "table" then return end
  for _, key in ipairs(list) do
    if type(key) == "string" then watch(key) end
  end
end

-- One key this worker watches: its window's alert, when the events are
-- `wait` seconds old and the window is free.
local function check(key, now)
  local f, err = the_store:get(skey("f:", key))
  if f == nil then
    if err then return store_error(err) end
    local n = the_store:get(skey("n:", key))
    if not n or n == 0 then return unwatch(key) end
    -- A count without its sample (a store that lost it): make one.
    the_store:add(skey("f:", key), json.encode({ at = now, fields = {} }), S.keep)
    return
  end
  local sample = type(f) == "string" and json.decode(f)
  if type(sample) ~= "table" then sample = { at = now, fields = {} } end
  if now - (tonumber(sample.at) or 0) < S.wait then return end
  if not the_store:add(skey("g:", key), true, S.window) then return end -- someone's window runs
  -- The sample goes before the count: an event counted after the take
  -- then always finds no sample and starts the next batch with its own.
  the_store:delete(skey("f:", key))
  local n = take(skey("n:", key))
  if n > 0 then
    enqueue(key, n, sample)
  else
    the_store:delete(skey("g:", key)) -- nothing to say: the window stays free
  end
end

--- One tick of the flusher: this worker's counts into the store, then
-- every watched key checked.
function _M.flush()
  if not S then return end
  if not seeded then seed() end
  if npending > 0 then
    local batch = pending
    pending, npending = {}, 0
    for key, p in pairs(batch) do
      local total, err
      if watched[key] or nwatched < S.max_keys then
        total, err = the_store:incr(skey("n:", key), p.n, S.keep)
      else
        count("dropped") -- every check of a key costs store calls each tick: bounded
      end
      if total then
        the_store:add(skey("f:", key), json.encode(p.sample), S.keep)
        watch(key)
        if total == p.n then index_change(key, true) end -- a new batch
      elseif err then
        store_error(err)
        local q = pending[key] -- keep it for the next tick
        if q then q.n = q.n + p.n else pending[key], npending = p, npending + 1 end
      end
    end
  end
  local now = wxd.now()
  for key in pairs(watched) do check(key, now) end
  local mono = monotonic_ms()
  for key, until_ms in pairs(seen) do
    if until_ms <= mono then
      seen[key] = nil
      nseen = nseen - 1
    end
  end
end

-- A slot of the robot's rate: a sliding log of send times in the store,
-- swapped by compare-and-set, so the limit holds across workers and nodes.
local function take_slot()
  local k = skey("rate:", S.robot)
  for _ = 1, 50 do
    local old, err = the_store:get(k)
    if old == nil and err then
      store_error(err)
      return false
    end
    local now = wxd.now()
    local kept = {}
    if type(old) == "string" then
      for t in gmatch(old, "[^,]+") do
        t = tonumber(t)
        if t and now - t < S.rate_period then kept[#kept + 1] = format("%.3f", t) end
      end
    end
    if #kept >= S.rate then return false end
    kept[#kept + 1] = format("%.3f", now)
    if the_store:cas(k, old, concat(kept, ","), S.rate_period) then return true end
  end
  return false
end

local sending = false
--- One tick of the sender: queued messages to the robot, one at a time.
function _M.drain()
  if not S or sending then return end
  sending = true
  local ok, err = pcall(function()
    while qhead <= qtail do
      if not take_slot() then
        -- Every message queued waits for the rate now: each counts once.
        for i = qhead, qtail do
          if not queue[i].deferred then
            queue[i].deferred = true
            count("deferred")
          end
        end
        break
      end
      local m = queue[qhead]
      queue[qhead] = nil
      qhead = qhead + 1
      local res, kind, detail = http.request({ method = "POST", url = S.webhook, body = m.body,
        headers = { ["Content-Type"] = "application/json" }, timeout = S.timeout, trace = false, alert = false })
      local code = res and res.status == 200 and tonumber(match(res.body, '"errcode"%s*:%s*(%-?%d+)'))
      if code == 0 then
        count("sent")
      else
        count("failed")
        -- The webhook's URL holds its key: only the host is logged.
        local why = res and ("status " .. res.status .. (code and (" errcode " .. code) or ""))
          or (kind .. ": " .. tostring(detail))
        log.warn("wxd.alert: the robot did not take an alert", { key = m.key, count = m.n,
          host = (select(2, http.parse_url(S.webhook))), error = why })
      end
    end
  end)
  sending = false
  if not ok then log.error("wxd.alert: sending failed", { error = tostring(err) }) end
end

------------------------------------------------------------------------
-- The hooks: failed outbound calls and opened breakers
------------------------------------------------------------------------

local function errcode_of(res)
  if type(res) ~= "table" or type(res.body) ~= "string" then return nil end
  return tonumber(match(sub(res.body, 1, 1024), '"errcode"%s*:%s*(%-?%d+)'))
end

local function strip_query(url)
  if type(url) ~= "string" then return nil end
  return (match(url, "^[^?#]*"))
end

local function upstream_failure(spec, res, err, detail)
  local hostport = spec.host .. ":" .. spec.port
  local path = match(spec.request, "^%S+ ([^ ?#]*)") or "/"
  _M.send{ key = "upstream:" .. hostport, title = "upstream failing: " .. hostport,
    fields = { url = (spec.tls and "https://" or "http://") .. hostport .. path, errcode = errcode_of(res),
      status = res and res.status or nil,
      error = err and (err .. (detail and (": " .. detail) or "")) or nil } }
end

local function breaker_opened(c, url, res, err)
  local st = c:stats()
  _M.send{ key = "breaker:" .. st.name, title = "circuit breaker open: " .. st.name,
    fields = { url = strip_query(url), errcode = errcode_of(res), status = type(res) == "table" and res.status or nil,
      error = type(err) == "string" and err or nil, consecutive_failures = st.consecutive_failures,
      window_calls = st.window_calls, window_failures = st.window_failures } }
end

------------------------------------------------------------------------
-- Start
------------------------------------------------------------------------

--- Starts this worker's alerting from config.lua's `alert` section (the
-- server calls it when the app loads; send() calls it on first use).
-- @treturn ?boolean true when configured and started
-- @treturn ?string error in the section, or "not configured"
function _M.start()
  if S then return true end
  local cfg = type(wxd.config) == "table" and wxd.config.alert or nil
  if cfg == nil then return nil, "not configured" end
  local s, err = _M.settings(cfg)
  if not s then return nil, err end
  local ok, st = pcall(store.new, wxd.config.store)
  if not ok then return nil, "config.alert: " .. tostring(st) end
  S, the_store = s, st
  timer.every(s.interval_ms, _M.flush)
  timer.every(s.interval_ms, _M.drain)
  if s.on_upstream_failure then http.on_failure = upstream_failure end
  if s.on_breaker_open then retry.on_breaker_open = breaker_opened end
  return true
end

--- This worker's numbers: pending (keys not yet in the store), watched,
-- queued, and the counts of sent, failed, dropped, suppressed, deferred,
-- store_errors.
function _M.stats()
  local out = { pending = npending, watched = nwatched, queued = qtail - qhead + 1, sending = sending }
  for k, v in pairs(stats) do out[k] = v end
  return out
end

return _M
