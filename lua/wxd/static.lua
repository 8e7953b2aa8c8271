--- wxd.static: serving the files of a directory (app:static).
--
-- GET and HEAD under a prefix: ETag and Last-Modified with 304 answers to
-- If-None-Match / If-Modified-Since, single byte ranges (206, 416, If-Range),
-- Content-Type by extension, an optional index file.
--
-- Only files inside the root are served. A request is refused (404, the
-- same answer as a missing file, so probing learns nothing) when its raw
-- path has an encoded slash, backslash or NUL (%2F, %5C, %00), or once
-- decoded a NUL, a backslash, an empty, "." or ".." segment, or a segment
-- starting with "." (dotfiles, unless opts.dotfiles). The file's real path
-- (symlinks resolved) must then lie under the root's real path: a symlink
-- inside the root that points out of it is refused too.
--
-- How bytes go out: a file up to SMALL bytes is read whole and sent as one
-- response; for a larger one the head goes out with its Content-Length and
-- the core sends the range (wxd.core.http.send_file: sendfile(2) on plain
-- connections, read and encrypt on HTTPS), so memory stays bounded whatever
-- the file size. Reads happen on the worker thread (from the page cache
-- they cost microseconds; a cold disk stalls the worker for the read).
--
-- @module wxd.static
-- @usage
-- app:static("/assets", "public", { max_age = 3600 })

local fs = require "wxd.core.fs"
local send_file = require("wxd.core.http").send_file

local type, error, tostring, tonumber, pairs = type, error, tostring, tonumber, pairs
local str_find, str_sub, str_lower, str_format, str_match, str_byte =
  string.find, string.sub, string.lower, string.format, string.match, string.byte
local io_open, os_date, floor = io.open, os.date, math.floor

local _M = {}

_M.SMALL = 64 * 1024 -- read whole up to this size; larger files go by send_file

local TYPES = {
  html = "text/html; charset=utf-8", htm = "text/html; charset=utf-8",
  css = "text/css; charset=utf-8", js = "text/javascript; charset=utf-8",
  mjs = "text/javascript; charset=utf-8", json = "application/json", map = "application/json",
  txt = "text/plain; charset=utf-8", md = "text/markdown; charset=utf-8", csv = "text/csv; charset=utf-8",
  xml = "application/xml", svg = "image/svg+xml", png = "image/png", jpg = "image/jpeg",
  jpeg = "image/jpeg", gif = "image/gif", webp = "image/webp", avif = "image/avif",
  ico = "image/vnd.microsoft.icon", woff = "font/woff", woff2 = "font/woff2", ttf = "font/ttf",
  otf = "font/otf", pdf = "application/pdf", zip = "application/zip", gz = "application/gzip",
  wasm = "application/wasm", mp4 = "video/mp4", webm = "video/webm", mp3 = "audio/mpeg",
  ogg = "audio/ogg", wav = "audio/wav", webmanifest = "application/manifest+json",
}
_M.TYPES = TYPES
local DEFAULT_TYPE = "application/octet-stream"

local function http_date(t)
  return os_date("!%a, %d %b %Y %H:%M:%S GMT", t)
end

local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8, Sep = 9, Oct = 10,
  Nov = 11, Dec = 12 }

-- Seconds since the epoch of an IMF-fixdate ("Sun, 06 Nov 1994 08:49:37
-- GMT"), or nil: the only form senders may generate (RFC 9110 5.6.7).
local function parse_http_date(s)
  if type(s) ~= "string" then return nil end
  local d, mon, y, hh, mm, ss = str_match(s, "^%a%a%a, (%d%d) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT$")
  local m = MONTHS[mon or ""]
  if not m then return nil end
  y, m, d = tonumber(y), m, tonumber(d)
  -- Days from the civil date (proleptic Gregorian), no time zone involved.
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  local days = era * 146097 + doe - 719468
  return days * 86400 + tonumber(hh) * 3600 + tonumber(mm) * 60 + tonumber(ss)
end
_M.parse_http_date = parse_http_date

-- Does an If-None-Match list name this ETag (weak comparison)?
local function etag_listed(list, etag)
  if str_find(list, "^%s*%*%s*$") then return true end
  for tag in list:gmatch("[^,]+") do
    tag = tag:gsub("^%s+", ""):gsub("%s+$", ""):gsub("^W/", "")
    if tag == etag then return true end
  end
  return false
end

-- A single "bytes=" range against a size: first, last (inclusive); or
-- "unsatisfiable"; or nil when the header is to be ignored (invalid,
-- another unit, several ranges: the whole file is then sent).
local function parse_range(h, size)
  local spec = str_match(h, "^%s*bytes%s*=%s*(.-)%s*$")
  if not spec or str_find(spec, ",", 1, true) then return nil end
  local a, b = str_match(spec, "^(%d*)%-(%d*)$")
  if not a or (a == "" and b == "") or #a > 15 or #b > 15 then return nil end
  if a == "" then
    local n = tonumber(b)
    if n == 0 or size == 0 then return "unsatisfiable" end
    if n > size then n = size end
    return size - n, size - 1
  end
  local first = tonumber(a)
  if b ~= "" and tonumber(b) < first then return nil end
  if first >= size then return "unsatisfiable" end
  local last = b == "" and size - 1 or tonumber(b)
  if last >= size then last = size - 1 end
  return first, last
end
_M.parse_range = parse_range

-- The decoded path below the prefix, or nil when it must be refused.
local function safe_relative(raw_path, rel, dotfiles)
  local lp = str_lower(raw_path)
  if str_find(lp, "%2f", 1, true) or str_find(lp, "%5c", 1, true) or str_find(lp, "%00", 1, true) then
    return nil
  end
  if str_find(rel, "\0", 1, true) or str_find(rel, "\\", 1, true) then return nil end
  if rel == "" then return rel end
  local pos, len = 1, #rel
  while pos <= len do
    local slash = str_find(rel, "/", pos, true)
    local seg = str_sub(rel, pos, (slash or len + 1) - 1)
    if seg == "" then
      -- Only a trailing slash (a directory) may leave a segment empty.
      if slash then return nil end
    elseif str_byte(seg, 1) == 46 then -- '.'
      if seg == "." or seg == ".." or not dotfiles then return nil end
    end
    if not slash then break end
    pos = slash + 1
  end
  return rel
end
_M.safe_relative = safe_relative

local function not_found()
  return 404, '{"error":"not found"}'
end

-- Reads [first, last] of an open file.
local function read_range(f, first, n)
  if first > 0 then f:seek("set", first) end
  return f:read(n) or ""
end

local function check_opts(opts)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error("wxd.static: options must be a table, got a " .. type(opts), 4)
  end
  for k, v in pairs(opts) do
    if k == "index" then
      if v ~= false and (type(v) ~= "string" or v == "" or str_find(v, "[/\\%z]")) then
        error("wxd.static: index must be a file name or false", 4)
      end
    elseif k == "max_age" then
      if type(v) ~= "number" or v < 0 or v % 1 ~= 0 then
        error("wxd.static: max_age must be a whole number of seconds", 4)
      end
    elseif k == "dotfiles" or k == "etag" or k == "last_modified" then
      if type(v) ~= "boolean" then error("wxd.static: " .. k .. " must be a boolean", 4) end
    elseif k == "types" then
      if type(v) ~= "table" then error("wxd.static: types must be a table of extension → type", 4) end
    else
      error("wxd.static: unknown option " .. tostring(k), 4)
    end
  end
  return opts
end

--- Register GET (and so HEAD) routes serving `dir` under `prefix` on an
-- app or a group. Called by `app:static(prefix, dir, opts)`.
-- @tparam table router an app or a group
-- @tparam string prefix e.g. "/assets" ("/" for the whole site)
-- @tparam string dir the root directory (relative to the working directory
--   or absolute); it must exist when the app loads
-- @tparam[opt] table opts index (file name, default "index.html"; false for
--   none), max_age (Cache-Control seconds, default 0), dotfiles (default
--   false), etag, last_modified (default true), types (extension → type)
-- @treturn table the router
function _M.mount(router, prefix, dir, opts)
  if type(prefix) ~= "string" or str_byte(prefix, 1) ~= 47 or (prefix ~= "/" and str_byte(prefix, -1) == 47) then
    error("wxd.static: prefix must start with '/' and not end with '/' (or be \"/\"), got " .. tostring(prefix), 3)
  end
  if type(dir) ~= "string" or dir == "" then
    error("wxd.static: dir must be a directory path", 3)
  end
  opts = check_opts(opts)
  local root, err = fs.realpath(dir)
  local st = root and fs.stat(root)
  if not st or not st.dir then
    error("wxd.static: " .. dir .. ": " .. (err or "not a directory"), 3)
  end
  local index = opts.index
  if index == nil then index = "index.html" end
  local dotfiles = opts.dotfiles or false
  local use_etag = opts.etag ~= false
  local use_lm = opts.last_modified ~= false
  local cache_control = "public, max-age=" .. (opts.max_age or 0)
  local types = {}
  for k, v in pairs(TYPES) do types[k] = v end
  for k, v in pairs(opts.types or {}) do types[str_lower(k)] = v end
  local root_slash = root == "/" and "/" or root .. "/"

  local function serve(req, res)
    local rel = safe_relative(req.path, req.params.path or "", dotfiles)
    if not rel then return not_found() end
    local path = root_slash .. rel
    local info = fs.stat(path)
    if info and info.dir then
      if not index then return not_found() end
      if rel ~= "" and str_sub(rel, -1) ~= "/" then
        -- Relative links in the index resolve against the directory.
        local q = req.query_string
        res:redirect(req.path .. "/" .. (q ~= "" and "?" .. q or ""), 301)
        return
      end
      path = path .. index -- path ends in '/' here
      info = fs.stat(path)
    elseif str_sub(rel, -1) == "/" then
      return not_found()
    end
    if not info or not info.file then return not_found() end
    local real = fs.realpath(path)
    if not real or str_sub(real, 1, #root_slash) ~= root_slash then return not_found() end

    local size, mtime = info.size, info.mtime
    local h = res.headers
    local etag = use_etag and str_format('"%x-%x"', mtime, size) or nil
    local last_modified = use_lm and http_date(mtime) or nil
    h["Cache-Control"] = cache_control
    if etag then h["ETag"] = etag end
    if last_modified then h["Last-Modified"] = last_modified end

    local inm = req.headers["if-none-match"]
    local fresh
    if inm and etag then
      fresh = etag_listed(inm, etag)
    elseif inm == nil and last_modified then
      local ims = parse_http_date(req.headers["if-modified-since"])
      fresh = ims and mtime <= ims
    end
    if fresh then
      return 304
    end

    local ext = str_match(real, "%.([^./]+)$")
    h["Content-Type"] = ext and types[str_lower(ext)] or DEFAULT_TYPE
    h["X-Content-Type-Options"] = "nosniff"
    h["Accept-Ranges"] = "bytes"

    local first, last, status = 0, size - 1, 200
    local range = req.method == "GET" and req.headers.range
    if range then
      local if_range = req.headers["if-range"]
      local applies = true
      if if_range then
        if str_byte(if_range, 1) == 34 or str_sub(if_range, 1, 2) == "W/" then
          applies = etag ~= nil and if_range == etag -- strong comparison
        else
          applies = last_modified ~= nil and if_range == last_modified
        end
      end
      if applies then
        local a, b = parse_range(range, size)
        if a == "unsatisfiable" then
          h["Content-Range"] = "bytes */" .. str_format("%d", size)
          h["Content-Type"] = nil
          return 416, ""
        elseif a then
          first, last, status = a, b, 206
          h["Content-Range"] = str_format("bytes %d-%d/%d", first, last, size)
        end
      end
    end

    local n = last - first + 1
    local f = io_open(real, "rb")
    if not f then return not_found() end
    res.status = status
    if n <= _M.SMALL then
      local body = n > 0 and read_range(f, first, n) or ""
      f:close()
      res.body = body
      return
    end
    f:close()
    -- Streamed with its length (identity coding, the connection stays
    -- open): the head now, then the core sends the range itself.
    h["Content-Length"] = str_format("%d", n)
    if not res:write("") or req.method == "HEAD" then
      return
    end
    -- nil, err: the client went away, or the file changed since the stat;
    -- the core has then cut the response short.
    send_file(real, first, n)
  end

  if prefix == "/" then
    router:get("/*path", serve)
  else
    router:get(prefix .. "/*path", serve)
    if index then
      -- The directory itself: on to its index, as for any subdirectory.
      router:get(prefix, function(req, res)
        local q = req.query_string
        res:redirect(req.path .. "/" .. (q ~= "" and "?" .. q or ""), 301)
      end)
    end
  end
  return router
end

return _M
