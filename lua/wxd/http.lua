--- wxd.http: outbound HTTP/1.1 and HTTPS requests that never block the worker.
--
-- A request suspends the calling coroutine (a request handler, a timer run,
-- a `wxd script` main chunk) until the answer comes; the worker serves
-- others meanwhile. Connections are kept alive and reused per host (scheme,
-- name, port and TLS settings) by a pool that belongs to the worker, not to
-- the app generation, so they survive hot reloads.
--
-- Results: a response table `{ status = 200, headers = { ... }, body = "..." }`
-- (header names in lower case; a repeated header joined with ", ", except
-- `set-cookie`, which is always a list), or `nil, kind, detail` where kind
-- is one of "timeout", "connect", "tls", "dns", "protocol", "too_large" and
-- detail a sentence for logs (it never holds the URL's path or query, nor a
-- secret). Any HTTP status is a response, not an error. Wrong argument
-- types and malformed URLs raise.
--
-- HTTPS verifies the peer's certificate chain and host name against the
-- system trust store, or `ca_file` only; `verify = false` turns that off
-- (logged once per host as a warning). Client certificates (mutual TLS, as
-- WeChat Pay v2 refunds need) come as a PEM pair or a PKCS#12 bundle.
--
-- @module wxd.http
-- @usage
-- local http = require "wxd.http"
-- local res, err, detail = http.request{
--   method = "POST", url = "https://api.mch.weixin.qq.com/secapi/pay/refund",
--   headers = { ["Content-Type"] = "text/xml" }, body = xml,
--   client_cert = { pkcs12 = p12_bytes, passphrase = mch_id },
--   timeout = { connect = 2, send = 5, read = 5, total = 10 },
-- }
-- if not res then log.error("refund failed", { kind = err, detail = detail }) end

local core = require "wxd.core.fetch"
local wxd_core = require "wxd.core"
local metrics = require "wxd.metrics"
local trace = require "wxd.trace"
local gray_baggage = require("wxd.gray").baggage

local type, pairs, ipairs, tostring, tonumber, error, concat, sort =
  type, pairs, ipairs, tostring, tonumber, error, table.concat, table.sort
local lower, upper, find, match, format, gsub, byte, sub =
  string.lower, string.upper, string.find, string.match, string.format, string.gsub, string.byte, string.sub
local ceil, floor = math.ceil, math.floor

local _M = {}

local DEFAULT_TIMEOUT = { connect = 5, send = 10, read = 10, total = 30 } -- seconds
local DEFAULT_MAX_BODY = 10 * 1024 * 1024
local DEFAULT_MAX_HEADER = 64 * 1024
local USER_AGENT = "wxd/" .. wxd_core.version
local IDEMPOTENT = { GET = true, HEAD = true, OPTIONS = true, TRACE = true, PUT = true, DELETE = true }
-- Framing headers are the client's: a caller's value is ignored, as the
-- server ignores a handler's.
local OWNED = { ["content-length"] = true, ["transfer-encoding"] = true, connection = true }
local REDIRECT = { [301] = true, [302] = true, [303] = true, [307] = true, [308] = true }

local function fail(msg, level) error("wxd.http: " .. msg, level + 1) end

local function is_token(s) return type(s) == "string" and find(s, "^[%w!#$%%&'*+%-.^_`|~]+$") ~= nil end

local function check_value(name, v, level)
  if type(v) == "number" then v = tostring(v) end
  if type(v) ~= "string" then fail("header " .. name .. " must be a string, a number or a list of them", level + 1) end
  if find(v, "[\r\n%z]") then fail("header " .. name .. " contains CR, LF or NUL", level + 1) end
  return v
end

--- Splits an http(s) URL. Returns scheme, host (lower case, no brackets),
-- port, target (path and query, at least "/"), authority as written.
-- Raises on anything else.
local function parse_url(url, level)
  if type(url) ~= "string" then fail("url must be a string", level + 1) end
  local scheme, rest = match(url, "^(%a[%w+.-]*)://(.*)$")
  scheme = scheme and lower(scheme)
  if scheme ~= "http" and scheme ~= "https" then fail("url must start with http:// or https://", level + 1) end
  local authority, target = match(rest, "^([^/?#]*)(.*)$")
  target = gsub(target, "#.*$", "")
  if target == "" then target = "/" elseif byte(target) == 63 then target = "/" .. target end -- "?"
  if find(target, "[%c ]") then fail("url contains spaces or control characters", level + 1) end
  if find(authority, "@", 1, true) then fail("user:password@ in a url is not supported (use headers)", level + 1) end
  local host, port
  if byte(authority) == 91 then -- "[v6]"
    host, port = match(authority, "^%[([%x:.]+)%]:?(%d*)$")
  else
    host, port = match(authority, "^([%w._-]+):?(%d*)$")
  end
  if not host then fail("url has no valid host", level + 1) end
  port = port ~= "" and tonumber(port) or (scheme == "https" and 443 or 80)
  if port < 1 or port > 65535 then fail("url has a bad port", level + 1) end
  return scheme, lower(host), port, target, authority
end
--- Splits an http(s) URL: scheme, host (lower case, without brackets),
-- port, target (path and query, "/" at least). Raises on anything else.
function _M.parse_url(url)
  local scheme, host, port, target = parse_url(url, 2)
  return scheme, host, port, target
end

local function url_encode(s)
  return (gsub(tostring(s), "[^%w%-._~]", function(c) return format("%%%02X", byte(c)) end))
end

local function seconds_to_ms(v, name, level)
  if type(v) ~= "number" or not (v > 0 and v <= 1e7) then
    fail("timeout." .. name .. " must be a number of seconds > 0", level + 1)
  end
  local ms = ceil(v * 1000)
  return ms < 1 and 1 or ms
end

local warned = {} -- hosts already warned about verify = false (per Lua state)

--- Builds what the core needs from the caller's options. Raises on misuse.
-- prepare's trace step: the headers that carry the running request's
-- context (caller-set ones win), and the client span's id when spans are
-- exported. Returns the context (nil outside a request).
-- A gray request's colour joins the W3C baggage: appended to the caller's
-- own baggage header (its last line), unless that names wxd-gray already.
local function add_trace_headers(lines, seen, host, opts, baggage)
  if opts.trace == false then return nil end
  local span_id = trace.exporting() and trace.new_span_id() or nil
  local ctx, th = trace.outbound(host, span_id)
  if not ctx then return nil end
  for name, v in pairs(th) do
    if not seen[name] then lines[#lines + 1] = name .. ": " .. v end
  end
  if ctx.gray then
    if baggage then
      if gray_baggage(ctx.gray, concat(baggage.values, ",")) then
        local last = baggage.values[#baggage.values]
        lines[baggage.at] = find(last, "%S") and lines[baggage.at] .. "," .. gray_baggage(ctx.gray)
          or baggage.name .. ": " .. gray_baggage(ctx.gray)
      end
    else
      lines[#lines + 1] = "baggage: " .. gray_baggage(ctx.gray)
    end
  end
  ctx.client_span_id = span_id
  return ctx
end

local function prepare(opts, level)
  if type(opts) ~= "table" then fail("options must be a table", level + 1) end
  local method = opts.method or "GET"
  if not is_token(method) then fail("method must be a token such as \"GET\"", level + 1) end
  method = upper(method)
  local scheme, host, port, target, authority = parse_url(opts.url, level + 1)
  if opts.query ~= nil then
    if type(opts.query) ~= "table" then fail("query must be a table", level + 1) end
    local keys, parts = {}, {}
    for k in pairs(opts.query) do keys[#keys + 1] = tostring(k) end
    sort(keys)
    for _, k in ipairs(keys) do
      local v = opts.query[k]
      if v == nil then v = opts.query[tonumber(k)] end
      parts[#parts + 1] = url_encode(k) .. "=" .. url_encode(v)
    end
    if #parts > 0 then target = target .. (find(target, "?", 1, true) and "&" or "?") .. concat(parts, "&") end
  end
  local body = opts.body
  if body ~= nil and type(body) ~= "string" then fail("body must be a string", level + 1) end

  local lines = { method .. " " .. target .. " HTTP/1.1" }
  local has_host, has_ua = false, false
  local seen = {}
  local baggage -- the caller's baggage lines: { at = last line, values = { ... } }
  if opts.headers ~= nil then
    if type(opts.headers) ~= "table" then fail("headers must be a table", level + 1) end
    local names = {}
    for name in pairs(opts.headers) do
      if not is_token(name) then fail("header name " .. tostring(name) .. " is not a token", level + 1) end
      names[#names + 1] = name
    end
    sort(names) -- the same request bytes every time
    for _, name in ipairs(names) do
      local v, lname = opts.headers[name], lower(name)
      seen[lname] = true
      if lname == "host" then has_host = true elseif lname == "user-agent" then has_ua = true end
      if not OWNED[lname] then
        if type(v) == "table" then
          for _, each in ipairs(v) do lines[#lines + 1] = name .. ": " .. check_value(name, each, level + 1) end
        else
          lines[#lines + 1] = name .. ": " .. check_value(name, v, level + 1)
        end
        if lname == "baggage" and (type(v) ~= "table" or v[1] ~= nil) then
          local vals = {}
          for _, each in ipairs(type(v) == "table" and v or { v }) do vals[#vals + 1] = tostring(each) end
          baggage = { at = #lines, values = vals, name = name }
        end
      end
    end
  end
  local ctx = add_trace_headers(lines, seen, host, opts, baggage)
  if not has_host then lines[#lines + 1] = "Host: " .. authority end
  if not has_ua then lines[#lines + 1] = "User-Agent: " .. USER_AGENT end
  if body or method == "POST" or method == "PUT" or method == "PATCH" then
    lines[#lines + 1] = "Content-Length: " .. (body and #body or 0)
  end
  local keepalive = opts.keepalive ~= false
  if not keepalive then lines[#lines + 1] = "Connection: close" end
  lines[#lines + 1] = "\r\n"

  local t = opts.timeout
  local tc, ts, tr, tt = DEFAULT_TIMEOUT.connect, DEFAULT_TIMEOUT.send, DEFAULT_TIMEOUT.read, DEFAULT_TIMEOUT.total
  if type(t) == "number" then
    tt = t
  elseif type(t) == "table" then
    tc, ts, tr, tt = t.connect or tc, t.send or ts, t.read or tr, t.total or tt
  elseif t ~= nil then
    fail("timeout must be seconds or a table { connect, send, read, total }", level + 1)
  end
  local max_body = opts.max_body or DEFAULT_MAX_BODY
  if type(max_body) ~= "number" or not (max_body >= 0 and max_body <= 1e12) then
    fail("max_body must be a number of bytes, 0..1e12", level + 1)
  end
  local max_header = opts.max_header_bytes or DEFAULT_MAX_HEADER
  if type(max_header) ~= "number" or not (max_header >= 256 and max_header <= 1e8) then
    fail("max_header_bytes must be 256..1e8", level + 1)
  end

  local spec = {
    tls = scheme == "https", host = host, port = port, body = body,
    request = concat(lines, "\r\n"),
    head = method == "HEAD", idempotent = IDEMPOTENT[method] or false, keepalive = keepalive,
    connect_ms = seconds_to_ms(tc, "connect", level + 1), send_ms = seconds_to_ms(ts, "send", level + 1),
    read_ms = seconds_to_ms(tr, "read", level + 1), total_ms = seconds_to_ms(tt, "total", level + 1),
    max_body = max_body, max_header_bytes = max_header,
    trace_ctx = ctx, method = method, alert = opts.alert,
  }
  if opts.alert ~= nil and type(opts.alert) ~= "boolean" then fail("alert must be a boolean", level + 1) end
  if spec.tls then
    local verify = opts.verify
    if verify == nil then verify = true end
    if type(verify) ~= "boolean" then fail("verify must be a boolean", level + 1) end
    spec.verify = verify
    if not verify and not warned[host] then
      warned[host] = true
      require("wxd.log").warn("wxd.http: TLS certificate verification is off", { host = host })
    end
    if opts.ca_file ~= nil and type(opts.ca_file) ~= "string" then fail("ca_file must be a path", level + 1) end
    spec.ca_file = opts.ca_file
    local cc = opts.client_cert
    if cc ~= nil then
      if type(cc) ~= "table" then fail("client_cert must be a table", level + 1) end
      if cc.pkcs12 ~= nil then
        if type(cc.pkcs12) ~= "string" then fail("client_cert.pkcs12 must be the bundle's bytes", level + 1) end
        spec.pkcs12 = cc.pkcs12
      elseif type(cc.cert) == "string" and type(cc.key) == "string" then
        spec.cert, spec.key = cc.cert, cc.key
      else
        fail("client_cert must be { cert = pem, key = pem } or { pkcs12 = bytes, passphrase = ... }", level + 1)
      end
      if cc.passphrase ~= nil then
        if type(cc.passphrase) ~= "string" then fail("client_cert.passphrase must be a string", level + 1) end
        spec.passphrase = cc.passphrase
      end
    end
  end
  return spec, method, scheme, host, port, target
end

-- The URL a Location header points to, from the URL it came from.
local function resolve(base, location)
  if match(location, "^%a[%w+.-]*://") then return location end
  local scheme, authority, path = match(base, "^(%a[%w+.-]*)://([^/?#]*)([^?#]*)")
  if sub(location, 1, 2) == "//" then return scheme .. ":" .. location end
  if byte(location) == 47 then return scheme .. "://" .. authority .. location end -- "/"
  local dir = match(path, "^(.*/)") or "/"
  return scheme .. "://" .. authority .. dir .. location
end

local calls_metric, seconds_metric
local now, monotonic_ms = wxd_core.now, wxd_core.monotonic_ms

--- Called after an exchange that failed: a transport error, a 5xx, or a
-- WeChat answer with errcode -1 (system busy), as `on_failure(spec, res,
-- err, detail)`. Set by wxd.alert (`alert.on_upstream_failure`); nil
-- otherwise. A request with `alert = false` is never reported.
_M.on_failure = nil

local function failed(res, err)
  if not res then return err ~= nil end
  if res.status >= 500 then return true end
  local body = res.body
  return type(body) == "string" and #body < 4096 and find(body, '"errcode"%s*:%s*%-1[^%d]') ~= nil
end

-- One exchange (a redirect hop is another): counted by host and outcome
-- (the status class, or the error kind), timed, and recorded as a client
-- span of the running request when spans are exported.
local function send(spec)
  local t0, w0 = monotonic_ms(), now()
  local res, err, detail = core.request(spec)
  local secs = (monotonic_ms() - t0) / 1000
  if not calls_metric then
    calls_metric = metrics.builtin("counter", "wxd_http_client_requests_total",
      "Outbound wxd.http requests, by host and outcome (status class or error kind)", { "host", "outcome" },
      { max_series = 500 })
    seconds_metric = metrics.builtin("histogram", "wxd_http_client_request_duration_seconds",
      "Outbound wxd.http request time, by host", { "host" }, { max_series = 200 })
  end
  local outcome = res and (res.status >= 100 and res.status < 600 and floor(res.status / 100) .. "xx" or "other") or err
  metrics.count(calls_metric, { spec.host, outcome })
  metrics.observe(seconds_metric, secs, { spec.host })
  local hook = _M.on_failure
  if hook and spec.alert ~= false and failed(res, err) then pcall(hook, spec, res, err, detail) end
  local ctx = spec.trace_ctx
  if ctx and ctx.client_span_id and ctx.sampled and trace.room() then
    trace.record({
      trace_id = ctx.trace_id, span_id = ctx.client_span_id, parent_id = ctx.span_id, kind = 3, -- CLIENT
      name = spec.method .. " " .. spec.host, start_s = w0, end_s = w0 + secs, error = not res or res.status >= 500,
      attrs = { ["http.request.method"] = spec.method, ["server.address"] = spec.host, ["server.port"] = spec.port,
        ["http.response.status_code"] = res and res.status or nil, ["error.type"] = err },
    })
  end
  return res, err, detail
end

local function request_once(opts, level)
  local spec, method = prepare(opts, level + 1)
  local follow = opts.follow_redirects
  if follow ~= nil and type(follow) ~= "boolean" then fail("follow_redirects must be a boolean", level + 1) end
  local res, err, detail = send(spec)
  if not follow then return res, err, detail end
  local max = opts.max_redirects or 5
  if type(max) ~= "number" or max < 0 then fail("max_redirects must be a number >= 0", level + 1) end
  local url, n = opts.url, 0
  while res and REDIRECT[res.status] and type(res.headers.location) == "string" do
    if n >= max then return nil, "protocol", format("too many redirects (more than %d)", max) end
    n = n + 1
    local next_url = resolve(url, res.headers.location)
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.url = next_url
    if res.status == 303 or ((res.status == 301 or res.status == 302) and method == "POST") then
      o.method = method == "HEAD" and "HEAD" or "GET"
      o.body = nil
    end
    -- Credentials go only where they were meant for.
    local _, old_host, old_port = parse_url(url, level + 1)
    local ok, scheme, new_host, new_port = pcall(parse_url, next_url, 1)
    if not ok then return nil, "protocol", "redirect to an unsupported location" end
    if new_host ~= old_host or new_port ~= old_port or scheme ~= match(lower(url), "^(%a+)") then
      local h = {}
      for k, v in pairs(opts.headers or {}) do
        local l = lower(k)
        if l ~= "authorization" and l ~= "cookie" and l ~= "host" then h[k] = v end
      end
      o.headers = h
    end
    spec, method = prepare(o, level + 1)
    url = next_url
    res, err, detail = send(spec)
  end
  return res, err, detail
end

-- The same request as `opts` with its total timeout cut to `remaining` seconds.
local function within(opts, remaining)
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  local t = opts.timeout
  if type(t) == "number" then
    o.timeout = t < remaining and t or remaining
  else
    local c = {}
    if type(t) == "table" then for k, v in pairs(t) do c[k] = v end end
    local total = c.total or DEFAULT_TIMEOUT.total
    c.total = total < remaining and total or remaining
    o.timeout = c
  end
  return o
end

-- A request with `retry` and/or `breaker` (see request).
local function resilient(opts, level)
  local retry = require "wxd.retry"
  local ro = opts.retry
  if ro == true then ro = {} end
  if ro ~= nil and ro ~= false and type(ro) ~= "table" then fail("retry must be true or a table", level + 1) end
  local br = opts.breaker
  if type(br) == "string" then
    br = require("wxd.breaker").get(br)
  elseif br ~= nil and (type(br) ~= "table" or not br._c) then
    fail("breaker must be a name or come from wxd.breaker.new", level + 1)
  end
  local o = retry.options(ro or { attempts = 1 }, level + 1)
  o.breaker = br
  o.url = opts.url -- for a breaker-open alert
  if br and not (ro and ro.retryable) then o.retryable = br.is_failure end
  local method = upper(type(opts.method) == "string" and opts.method or "GET")
  -- A POST that timed out may have been done: repeat it only when told.
  if not (IDEMPOTENT[method] or (ro and ro.idempotent == true)) then o.attempts = 1 end
  prepare(opts, level + 1) -- misuse raises here, at the caller, not inside an attempt
  return retry.run(o, function(_, remaining)
    if remaining then
      if remaining <= 0.001 then return nil, "timeout", "retry deadline passed" end
      return request_once(within(opts, remaining), 1)
    end
    return request_once(opts, 1)
  end)
end

--- Sends a request and waits for the response.
-- @tparam table opts
--   `url` (http:// or https://, required); `method` ("GET"); `headers`
--   (name → string, number or list); `body` (string); `query` (table,
--   url-encoded and appended); `timeout` (seconds, or
--   `{ connect = 5, send = 10, read = 10, total = 30 }`: connect covers
--   waiting for a pooled connection, DNS, TCP and the TLS handshake; read
--   is the longest silence while reading); `max_body` (10 MiB);
--   `max_header_bytes` (64 KiB); `keepalive` (true); `follow_redirects`
--   (false) and `max_redirects` (5); for HTTPS `verify` (true), `ca_file`,
--   `client_cert` (`{ cert = pem, key = pem [, passphrase] }` or
--   `{ pkcs12 = bytes, passphrase = "..." }`); `retry` (true or the options
--   of wxd.retry, with `idempotent = true` to retry a POST or PATCH: only
--   idempotent methods are retried otherwise) retries timeouts, connect and
--   DNS errors, 5xx and WeChat's errcode -1 with backoff; `breaker` (a name
--   or a wxd.breaker) fails fast with `nil, "circuit open"` while the
--   upstream is failing (docs/resilience.md).
-- @treturn ?table `{ status, headers, body }`
-- @treturn ?string kind: "timeout", "connect", "tls", "dns", "protocol", "too_large"
-- @treturn ?string detail
-- @usage local res, err, detail = http.request{ url = "https://api.weixin.qq.com/cgi-bin/token", query = q }
function _M.request(opts)
  if type(opts) == "table" and (opts.retry or opts.breaker ~= nil) then return resilient(opts, 2) end
  return request_once(opts, 2)
end

--- `request` with method GET.
-- @tparam string url
-- @tparam[opt] table opts as for request
function _M.get(url, opts)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  o.method, o.url = "GET", url
  return _M.request(o)
end

--- `request` with method POST.
-- @tparam string url
-- @tparam string body
-- @tparam[opt] table opts as for request
function _M.post(url, body, opts)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  o.method, o.url, o.body = "POST", url, body
  return _M.request(o)
end

--- Sets limits of this worker's connection pool (shared by every app
-- generation of the worker; fields left out keep their values).
-- @tparam table limits `max_idle_per_host` (16), `max_conns_per_host`
--   (256; more requests wait in a queue, within their connect timeout),
--   `idle_timeout` (60 s), `dns_ttl` (30 s)
function _M.configure(limits)
  if type(limits) ~= "table" then fail("configure needs a table", 2) end
  local c = {}
  for k, v in pairs(limits) do
    if type(v) ~= "number" or v < 0 then fail("configure: " .. tostring(k) .. " must be a number >= 0", 2) end
    if k == "max_idle_per_host" or k == "max_conns_per_host" then
      if k == "max_conns_per_host" and v < 1 then fail("configure: max_conns_per_host must be >= 1", 2) end
      c[k] = v
    elseif k == "idle_timeout" or k == "dns_ttl" then
      c[k .. "_ms"] = ceil(v * 1000) >= 1 and ceil(v * 1000) or 1
    else
      fail("configure: unknown limit " .. tostring(k), 2)
    end
  end
  core.configure(c)
end

--- Counters of this worker's pool: requests (in flight), queued,
-- connections (open), idle, hosts, opened and reused (since start), and
-- the limits.
function _M.stats() return core.stats() end

return _M
