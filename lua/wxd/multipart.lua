--- wxd.multipart: multipart/form-data bodies (RFC 7578), with limits.
--
-- The core reads a request's whole body into memory (bounded by
-- limits.max_body_bytes) before the handler runs, so this parser works on
-- a string that is already there: it cannot spare the server that memory.
-- What it does bound is what the app gets: the number of parts, each
-- part's size, the total of the parts, the size of a part's headers. File
-- parts larger than `file_threshold` are written to a temporary file (mode
-- 0600 in /tmp, made by mkstemp via os.tmpname) and handed over
-- as a path instead of a string; wxd.app removes those files when the
-- request ends.
--
-- @module wxd.multipart
-- @usage
-- local form, err, status = req:multipart({ max_part_bytes = 5 * 1024 * 1024 })
-- if not form then return status, { error = err } end
-- local avatar = form.files.avatar -- { filename, content_type, size, path | data }

local type, error, tostring, pairs = type, error, tostring, pairs
local str_find, str_sub, str_lower, str_match, str_byte, str_gsub =
  string.find, string.sub, string.lower, string.match, string.byte, string.gsub
local io_open, os_tmpname, os_remove = io.open, os.tmpname, os.remove

local _M = {}

-- Defaults: generous for forms with a few uploads, small enough that a
-- hostile body cannot make thousands of parts or temp files.
_M.DEFAULTS = {
  max_parts = 100,                -- parts of any kind
  max_files = 20,                 -- parts with a filename
  max_part_bytes = 8 * 1024 * 1024, -- one part's content
  max_field_bytes = 64 * 1024,    -- one non-file part's content
  max_total_bytes = 32 * 1024 * 1024, -- all contents together
  max_header_bytes = 8 * 1024,    -- one part's header block
  file_threshold = 64 * 1024,     -- file parts above this go to disk (in /tmp)
}

local OPTION_NAMES = {}
for k in pairs(_M.DEFAULTS) do OPTION_NAMES[k] = true end

--- The boundary of a multipart/form-data Content-Type, or nil.
function _M.boundary(content_type)
  if type(content_type) ~= "string" then return nil end
  local ct = str_lower(content_type)
  if not str_find(ct, "^%s*multipart/form%-data%s*;") then return nil end
  local s, e = str_find(ct, ";%s*boundary%s*=%s*")
  if not s then return nil end
  local rest = str_sub(content_type, e + 1)
  local b = str_match(rest, '^"([^"]*)"') or str_match(rest, "^([^;%s]+)")
  -- RFC 2046: 1 to 70 characters.
  if not b or #b < 1 or #b > 70 then return nil end
  return b
end

-- Parameters of a Content-Disposition value: name and filename, quoted
-- or as tokens.
local function disposition(v)
  local kind = str_match(v, "^%s*([^;%s]+)")
  if not kind or str_lower(kind) ~= "form-data" then return nil end
  local params = {}
  local pos = #kind + 1
  local len = #v
  while pos <= len do
    local s, e, key = str_find(v, "^%s*;%s*([%w%-_%*]+)%s*=%s*", pos)
    if not s then break end
    key = str_lower(key)
    pos = e + 1
    local val
    if str_byte(v, pos) == 34 then
      local out, i = {}, pos + 1
      while i <= len do
        local c = str_byte(v, i)
        if c == 92 and str_byte(v, i + 1) == 34 then
          -- \" is a quote (curl writes it); any other backslash is itself,
          -- as browsers send file names (HTML's form encoding escapes
          -- nothing, and old browsers sent "C:\dir\a.png").
          out[#out + 1] = '"'
          i = i + 2
        elseif c == 34 then
          break
        else
          out[#out + 1] = str_sub(v, i, i)
          i = i + 1
        end
      end
      if i > len then return nil end -- unterminated quote
      val = table.concat(out)
      pos = i + 1
    else
      val = str_match(v, "^[^;%s]*", pos)
      pos = pos + #val
    end
    if params[key] == nil then params[key] = val end
  end
  return params
end

-- A client's file name without its directories ("C:\\x\\a.png", "../a.png").
local function basename(name)
  name = str_gsub(name, "%z", "")
  name = str_match(name, "([^/\\]*)$") or ""
  if name == "." or name == ".." then return "" end
  return name
end

local function remove_files(list)
  for i = 1, #list do
    if list[i] then
      os_remove(list[i])
      list[i] = false
    end
  end
end
_M.remove_files = remove_files

--- Parse a multipart/form-data body.
-- @tparam string body the whole body
-- @tparam string boundary from `_M.boundary(content_type)`
-- @tparam[opt] table opts limits (see DEFAULTS)
-- @tparam[opt] table tmp a list that gets the path of each temp file made
--   (so the caller can remove them; they are removed here on failure)
-- @treturn ?table { fields = name → value (last wins), files = name → file
--   (last wins), parts = every part in order }; a part is { name,
--   filename?, content_type, headers, size, data | path }
-- @treturn ?string "too large" or "malformed" (or "cannot store file")
-- @treturn ?number 413, 400 (or 500): the status to answer with
function _M.parse(body, boundary, opts, tmp)
  if type(body) ~= "string" then error("wxd.multipart: body must be a string", 2) end
  if type(boundary) ~= "string" or boundary == "" then error("wxd.multipart: boundary must be a string", 2) end
  local o = {}
  for k, v in pairs(_M.DEFAULTS) do o[k] = v end
  if opts ~= nil then
    if type(opts) ~= "table" then error("wxd.multipart: options must be a table", 2) end
    for k, v in pairs(opts) do
      if not OPTION_NAMES[k] then error("wxd.multipart: unknown option " .. tostring(k), 2) end
      if type(v) ~= "number" or v < 0 then
        error("wxd.multipart: " .. k .. " must be a number >= 0", 2)
      end
      o[k] = v
    end
  end
  local made = tmp or {}
  local function fail(msg, status)
    remove_files(made)
    return nil, msg, status
  end

  local dash = "--" .. boundary
  local delim = "\r\n" .. dash
  -- The first delimiter opens the body or follows a preamble's CRLF.
  local pos
  if str_sub(body, 1, #dash) == dash then
    pos = #dash + 1
  else
    local s = str_find(body, delim, 1, true)
    if not s then return fail("malformed", 400) end
    pos = s + #delim
  end

  local form = { fields = {}, files = {}, parts = {} }
  local nparts, nfiles, total = 0, 0, 0
  while true do
    -- After a delimiter: "--" ends the body, else optional whitespace and CRLF.
    if str_sub(body, pos, pos + 1) == "--" then
      return form
    end
    local eol = str_find(body, "^[ \t]*\r\n", pos)
    if not eol then return fail("malformed", 400) end
    pos = str_find(body, "\n", pos, true) + 1
    nparts = nparts + 1
    if nparts > o.max_parts then return fail("too large", 413) end

    -- Part headers, up to the blank line.
    local hend = str_find(body, "\r\n\r\n", pos, true)
    local headers = {}
    local cstart
    if str_sub(body, pos, pos + 1) == "\r\n" then
      cstart = pos + 2 -- no header at all
    else
      if not hend then return fail("malformed", 400) end
      if hend - pos > o.max_header_bytes then return fail("too large", 413) end
      -- A part whose header block runs into the next delimiter has none.
      local nd = str_find(body, delim, pos, true)
      if nd and nd < hend then return fail("malformed", 400) end
      for line in (str_sub(body, pos, hend - 1) .. "\r\n"):gmatch("(.-)\r\n") do
        local name, value = str_match(line, "^([^:%s]+)%s*:%s*(.-)%s*$")
        if not name then return fail("malformed", 400) end
        headers[str_lower(name)] = value
      end
      cstart = hend + 4
    end

    -- Content, up to the next delimiter.
    local dstart = str_find(body, delim, cstart, true)
    if not dstart then return fail("malformed", 400) end
    local size = dstart - cstart
    pos = dstart + #delim

    local cd = headers["content-disposition"]
    local params = cd and disposition(cd)
    if not params or not params.name or params.name == "" then return fail("malformed", 400) end
    local part = { name = params.name, headers = headers, size = size,
      content_type = headers["content-type"] or "text/plain" }
    local is_file = params.filename ~= nil
    if size > o.max_part_bytes or (not is_file and size > o.max_field_bytes) then
      return fail("too large", 413)
    end
    total = total + size
    if total > o.max_total_bytes then return fail("too large", 413) end
    if is_file then
      nfiles = nfiles + 1
      if nfiles > o.max_files then return fail("too large", 413) end
      part.filename = basename(params.filename)
      if size > o.file_threshold then
        -- os.tmpname makes the file (mkstemp, mode 0600) and returns its name.
        local path = os_tmpname()
        made[#made + 1] = path
        local f = io_open(path, "wb")
        local ok = f and f:write(str_sub(body, cstart, dstart - 1))
        if f then f:close() end
        if not ok then return fail("cannot store file", 500) end
        part.path = path
      else
        part.data = str_sub(body, cstart, dstart - 1)
      end
      form.files[part.name] = part
    else
      part.data = str_sub(body, cstart, dstart - 1)
      form.fields[part.name] = part.data
    end
    form.parts[nparts] = part
    if pos > #body then return fail("malformed", 400) end
  end
end

return _M
