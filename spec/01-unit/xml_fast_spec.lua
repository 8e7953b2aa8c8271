-- wxd.core.xml's flat path: WeChat's usual document shape read straight
-- from its bytes (no expat, no tree). It must accept only what expat reads
-- the same way; everything else goes to expat. Each document here is
-- decoded by the flat path (_decode_fast, nil when it declines), by expat
-- alone (_decode_expat) and by decode (either): the answers must agree.
local core = require "wxd.core.xml"
local messages = require "fixtures.mp.messages"

local MB, MD, ME = core.MAX_BYTES, core.MAX_DEPTH, core.MAX_ELEMENTS

local function pack(...) return { n = select("#", ...), ... } end

-- Decodes doc all three ways; returns whether the flat path took it.
local function agree(doc, mb, md, me, arrays, why)
  local e = { core._decode_expat(doc, mb, md, me, arrays) }
  local d = { core.decode(doc, mb, md, me, arrays) }
  local f = pack(core._decode_fast(doc, mb, md, me, arrays))
  local msg = (why or "") .. " " .. string.format("%q", doc) .. " limits " .. mb .. "/" .. md .. "/" .. me
  assert.same(e, d, msg)
  if f[1] == nil then
    assert.equal(1, f.n, msg) -- a decline is nil alone, never an error
    return false
  end
  assert.is_table(e[1], msg) -- taken: expat must accept it too
  f.n = nil
  assert.same(e, f, msg)
  return true
end

local function taken(doc, arrays)
  return agree(doc, MB, MD, ME, arrays)
end

-- ---- a generator of documents near the shape ----

local function pick(r, t) return t[r(#t)] end

local function utf8_char(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then return string.char(0xc0 + math.floor(cp / 64), 0x80 + cp % 64) end
  if cp < 0x10000 then
    return string.char(0xe0 + math.floor(cp / 4096), 0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
  end
  return string.char(0xf0 + math.floor(cp / 262144), 0x80 + math.floor(cp / 4096) % 64,
    0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
end

local EDGE_CHARS = {
  0x7f, 0x80, 0x9f, 0xa0, 0x7ff, 0x800, 0xfff, 0x1000, 0xd7ff, 0xe000, 0xfdd0, 0xfffd, 0x10000, 0x1fffe,
  0x10fffe, 0x10ffff, 0x4e2d, 0x754c,
}
local BAD_BYTES = {
  "\0", "\1", "\8", "\11", "\12", "\31", "\r", "\r\n",
  "\192\128", "\193\191", "\224\128\128", "\224\159\191", "\240\128\128\128", "\240\143\191\191", -- overlong
  "\237\160\128", "\237\191\191",            -- surrogates
  "\239\191\190", "\239\191\191",            -- U+FFFE, U+FFFF
  "\244\144\128\128", "\245\128\128\128", "\248", "\255", "\254", -- above U+10FFFF, never UTF-8
  "\128", "\191", "\194", "\226\130", "\240\159\152",             -- stray or cut sequences
}
local MARKUP = { "<", "&", ">", "]", "]]", "]]>", "]>", "&amp;", "&#65;", "&lt;", "<b>", "</b>", "<!---->", "<?p?>" }

local function random_text(r, cdata)
  local parts = {}
  for _ = 1, r(8) - 1 do
    local k = r(100)
    local s
    if k <= 45 then
      local n = r(6)
      local t = {}
      for i = 1, n do t[i] = string.char(pick(r, { r(26) + 64, r(26) + 96, r(10) + 47, 95, 46, 45, 58, 47 })) end
      s = table.concat(t)
    elseif k <= 55 then
      s = pick(r, { " ", "\t", "\n", "  " })
    elseif k <= 70 then
      s = utf8_char(r(5) == 1 and pick(r, EDGE_CHARS) or (0x80 + r(0x10ffff - 0x80)))
      if s:byte(1) == 0xed and s:byte(2) >= 0xa0 then s = "x" end -- utf8_char makes surrogates too: not here
    elseif k <= 80 then
      s = pick(r, BAD_BYTES)
    elseif k <= 90 then
      s = pick(r, MARKUP)
    else
      s = string.char(r(256) - 1)
    end
    parts[#parts + 1] = s
  end
  local t = table.concat(parts)
  if not cdata and r(2) == 1 then t = t:gsub("[%s<&>%]]", "") end -- often clean enough to stay on the path
  return t
end

local NAMES = { "ToUserName", "FromUserName", "CreateTime", "MsgType", "Content", "MsgId", "item", "A", "a",
  "_", "_x1", "Z9", "xml", "xmlfoo", "Encrypt" }
local BAD_NAMES = { "1a", "a-b", "a.b", "a:b", "\228\184\173", "-a", ".a" }

local function random_name(r)
  local k = r(10)
  if k <= 6 then return pick(r, NAMES) end
  if k <= 9 then
    local first = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
    local rest = first .. "0123456789"
    local i = r(#first)
    local t = { first:sub(i, i) }
    for j = 2, r(12) do
      local c = r(#rest)
      t[j] = rest:sub(c, c)
    end
    return table.concat(t)
  end
  return pick(r, BAD_NAMES)
end

local function random_element(r, depth)
  local name = random_name(r)
  local k = r(100)
  local open, close = "<" .. name .. ">", "</" .. name .. ">"
  if r(40) == 1 then open = "<" .. name .. ' a="1">' end
  if r(60) == 1 then open = "<" .. name .. " >" end
  if r(60) == 1 then close = "</" .. name .. " >" end
  if r(60) == 1 then close = "</" .. random_name(r) .. ">" end
  if k <= 45 then
    local text = random_text(r, true)
    local body = "<![CDATA[" .. text .. "]]>"
    if r(15) == 1 then body = body .. "<![CDATA[" .. random_text(r, true) .. "]]>" end
    if r(20) == 1 then body = body .. random_text(r, false) end
    if r(20) == 1 then body = random_text(r, false) .. body end
    if r(30) == 1 then body = body:sub(1, -2) end -- "]]" without ">"
    return open .. body .. close
  elseif k <= 85 then
    return open .. random_text(r, false) .. close
  elseif k <= 90 then
    return r(2) == 1 and "<" .. name .. "/>" or open .. close
  elseif k <= 95 and depth < 3 then
    local kids = {}
    for i = 1, r(3) do kids[i] = random_element(r, depth + 1) end
    return open .. table.concat(kids, pick(r, { "", " ", "\n" })) .. close
  else
    return open .. "<!-- c -->" .. random_text(r, false) .. close
  end
end

local PREFIXES = { '<?xml version="1.0"?>', '<?xml version="1.0" encoding="UTF-8"?>\n', "\239\187\191",
  "<!-- c -->", "<?pi x?>", "<!DOCTYPE xml>", " ", "\n" }
local SEPARATORS = { "", "", "", " ", "\n", "\r\n", "\t", "\n  ", "\r", "x", "<!---->", "<?p?>", "&amp;" }
local ROOTS = { { "<xml>", "</xml>" }, { "<xml>", "</xml>" }, { "<xml>", "</xml>" }, { "<xml >", "</xml>" },
  { "<Xml>", "</Xml>" }, { "<root>", "</root>" }, { '<xml a="1">', "</xml>" }, { "<xml>", "</xml >" } }

local function random_doc(r)
  local root = r(4) <= 3 and ROOTS[1] or pick(r, ROOTS)
  local t = {}
  if r(15) == 1 then t[#t + 1] = pick(r, PREFIXES) end
  t[#t + 1] = root[1]
  local n = r(9) - 1
  for _ = 1, n do
    t[#t + 1] = r(3) == 1 and pick(r, SEPARATORS) or ""
    t[#t + 1] = random_element(r, 1)
  end
  t[#t + 1] = r(3) == 1 and pick(r, SEPARATORS) or ""
  if r(40) ~= 1 then t[#t + 1] = root[2] end
  if r(4) == 1 then t[#t + 1] = pick(r, { " ", "\n", "\r\n", "\t \n", "x", "<!---->", "<xml/>", "\0" }) end
  local doc = table.concat(t)
  if r(30) == 1 then doc = doc:sub(1, r(#doc)) end
  return doc, n
end

-- Text of the shape: valid characters, and for plain text none of the
-- bytes that end it.
local function clean_text(r, cdata)
  local t = {}
  for i = 1, r(10) - (cdata and 1 or 0) do
    local k = r(10)
    if k <= 5 then
      t[i] = string.char(r(94) + 32)
    elseif k <= 8 then
      t[i] = utf8_char(r(3) == 1 and pick(r, EDGE_CHARS) or (0xa0 + r(0xd000)))
    elseif cdata then
      t[i] = pick(r, { " ", "\t", "\n", "]]", "]", "<![CDATA[", "]>", "]] >" })
    else
      t[i] = pick(r, { "\194\128", "\240\159\152\128", "\127" })
    end
  end
  local s = table.concat(t)
  if cdata then
    s = s:gsub("%]%]>", "")
    if s:sub(-2) == "]]" or s:sub(-1) == "]" then s = s .. "x" end -- "]]" + "]]>" would end earlier
    return s
  end
  s = s:gsub("[%s<&>%]]", "")
  return s ~= "" and s or "v"
end

-- A document of the shape, then perhaps one small change that may take it
-- out of the shape (or not).
local function near_doc(r)
  local t, names, n = { "<xml>" }, {}, r(10) - 1
  for _ = 1, n do
    local name = random_name(r)
    while name:find("^[%a_][%w_]*$") == nil or (names[name] and r(10) > 1) do name = random_name(r) end
    names[name] = true
    t[#t + 1] = pick(r, { "", "", " ", "\n", "\n  ", "\r\n", "\t" })
    local cdata = r(3) > 1
    t[#t + 1] = "<" .. name .. ">" .. (cdata and "<![CDATA[" .. clean_text(r, true) .. "]]>" or clean_text(r, false))
      .. "</" .. name .. ">"
  end
  t[#t + 1] = pick(r, { "", "", "\n", " " }) .. "</xml>" .. pick(r, { "", "", "\n", " \r\n" })
  local doc = table.concat(t)
  local k = r(8)
  if k == 1 then -- a byte replaced
    local at = r(#doc)
    doc = doc:sub(1, at - 1) .. string.char(r(256) - 1) .. doc:sub(at + 1)
  elseif k == 2 then -- something inserted
    local at = r(#doc + 1)
    local what = pick(r, { pick(r, BAD_BYTES), pick(r, MARKUP), " ", "\n", "\r", utf8_char(pick(r, EDGE_CHARS)) })
    doc = doc:sub(1, at - 1) .. what .. doc:sub(at)
  elseif k == 3 then -- a byte removed
    local at = r(#doc)
    doc = doc:sub(1, at - 1) .. doc:sub(at + 1)
  end
  return doc, n
end

describe("wxd.core.xml's flat path", function()
  it("takes a typical WeChat message of every kind whose shape is flat", function()
    local flat = 0
    for _, m in ipairs(messages) do
      local msg = core._decode_fast(m.xml, MB, MD, ME, { item = true })
      if not m.xml:find("<[%w_]+><[%w_]", 6) and not m.xml:find("<item>", 1, true) then
        assert.is_table(msg, m.name)
        flat = flat + 1
      end
      agree(m.xml, MB, MD, ME, { item = true }, m.name)
    end
    assert.truthy(flat >= 10, flat .. " of " .. #messages)
    local text = messages[1]
    assert.equal("text", text.name)
    local t, root = core._decode_fast(text.xml, MB, 10, 1000, { item = true })
    assert.equal("xml", root)
    for k, v in pairs(text.fields) do assert.equal(v, t[k]) end
  end)

  it("reads what expat reads, for hand-made documents at the edges of the shape", function()
    local yes = {
      "<xml></xml>", "<xml> \n\t\r</xml>\n", "<xml><a>1</a></xml>", "<xml><a><![CDATA[]]></a></xml>",
      "<xml>\r\n<a><![CDATA[x]]></a>\r\n<b>y</b>\r\n</xml>\r\n",
      "<xml><a><![CDATA[<b>&amp;</b> ]] ]>]]></a></xml>", "<xml><a><![CDATA[x]]]></a></xml>",
      "<xml><a><![CDATA[\t\n \127\194\128\239\191\189\244\143\191\191\240\144\128\128]]></a></xml>",
      "<xml><a>\228\184\150\231\149\140</a><B_9>x.y-z:/?=;'\"</B_9></xml>",
      "<xml><xmlns>1</xmlns><_>2</_><xml>3</xml></xml>",
      "<xml><" .. string.rep("n", 300) .. ">v</" .. string.rep("n", 300) .. "></xml>",
      "<xml><a><![CDATA[" .. string.rep("\229\190\174", 5000) .. "]]></a></xml>",
    }
    for _, doc in ipairs(yes) do assert.is_true(taken(doc), doc) end
    local no = {
      "<xml><a></a></xml>", "<xml><a/></xml>", "<xml><a> </a></xml>", "<xml><a>x y</a></xml>",
      "<xml><a>x]y</a></xml>", "<xml><a>x>y</a></xml>", "<xml><a>&amp;</a></xml>", "<xml><a>x&#65;</a></xml>",
      "<xml><a><![CDATA[x\r\ny]]></a></xml>", "<xml><a><![CDATA[x\ry]]></a></xml>",
      "<xml><a><![CDATA[\1]]></a></xml>", "<xml><a><![CDATA[\0]]></a></xml>",
      "<xml><a><![CDATA[\239\191\190]]></a></xml>", "<xml><a><![CDATA[\237\160\128]]></a></xml>",
      "<xml><a><![CDATA[\192\128]]></a></xml>", "<xml><a><![CDATA[\244\144\128\128]]></a></xml>",
      "<xml><a><![CDATA[\226\130]]></a></xml>", "<xml><a><![CDATA[x]]>y</a></xml>",
      "<xml><a>y<![CDATA[x]]></a></xml>", "<xml><a><![CDATA[x]]><![CDATA[y]]></a></xml>",
      "<xml><a><![CDATA[x]]></a>", "<xml><a><![CDATA[x]></a></xml>", "<xml><a><![CDATA[x",
      "<xml><a>1</a><a>2</a></xml>", "<xml><a>1</a><b>2</b><a>3</a></xml>",
      "<xml><a><b>1</b></a></xml>", '<xml><a x="1">1</a></xml>', "<xml><a >1</a></xml>",
      "<xml><a>1</a ></xml>", "<xml><a>1</b></xml>", "<xml><a>1</A></xml>", "<xml><a-b>1</a-b></xml>",
      "<xml><a.b>1</a.b></xml>", "<xml><1>1</1></xml>", "<xml><a>1</a><!-- c --></xml>",
      "<xml><?pi?><a>1</a></xml>", "<xml>x<a>1</a></xml>", "<xml><a>1</a>x</xml>",
      "<xml><a>1</a></xml>x", "<xml><a>1</a></xml><xml/>", "<xml><a>1</a></xml>\0",
      '<?xml version="1.0"?><xml><a>1</a></xml>', "\239\187\191<xml><a>1</a></xml>",
      "<!DOCTYPE xml><xml><a>1</a></xml>", " <xml><a>1</a></xml>", "<xml ><a>1</a></xml>",
      "<Xml><a>1</a></Xml>", "<root><a>1</a></root>", "<xml><a>1</a></xml >", "<xml/>", "<xml>",
      "", "<xml></xml", "<xml><a>\127\1</a></xml>",
    }
    for _, doc in ipairs(no) do assert.is_false(taken(doc), doc) end
  end)

  it("leaves arrays, limits and more children than it holds to expat", function()
    local doc = "<xml><item>1</item><b>2</b></xml>"
    assert.is_false(taken(doc, { item = true }))
    assert.is_true(taken(doc, { item = false }))
    assert.is_true(taken(doc, { other = true }))
    assert.is_false(taken(doc, { b = 1 }))
    -- The limits: within them taken, past them refused by expat as before.
    assert.is_true(agree(doc, #doc, 2, 3))
    assert.is_false(agree(doc, #doc - 1, 2, 3))
    assert.is_false(agree(doc, #doc, 1, 3))
    assert.is_false(agree(doc, #doc, 2, 2))
    assert.is_false(agree("<xml></xml>", 11, 1, 1)) -- expat takes it: depth 1, one element
    local many = {}
    for i = 1, 64 do many[i] = "<f" .. i .. ">" .. i .. "</f" .. i .. ">" end
    assert.is_true(taken("<xml>" .. table.concat(many, "", 1, 63) .. "</xml>"))
    assert.is_false(taken("<xml>" .. table.concat(many) .. "</xml>"))
  end)

  it("reads 20000 random documents near the shape exactly as expat does", function()
    local seed = tonumber(os.getenv("WXD_SPEC_SEED")) or os.time()
    math.randomseed(seed)
    local r = math.random
    local fast, slow = 0, 0
    for i = 1, 20000 do
      local doc, n
      if r(2) == 1 then doc, n = random_doc(r) else doc, n = near_doc(r) end
      local mb = pick(r, { MB, MB, MB, MB, #doc, math.max(#doc - 1, 0) })
      local md = pick(r, { MD, MD, 10, 2, 2, 1 })
      local me = pick(r, { ME, ME, 1000, n + 1, n + 1, math.max(n, 1) })
      local arrays = pick(r, { false, false, false, { item = true }, { A = true, a = false }, { xml = true } }) or nil
      if agree(doc, mb, md, me, arrays, "seed " .. seed .. " #" .. i) then fast = fast + 1 else slow = slow + 1 end
    end
    -- Both ways exercised, the fast one often.
    assert.truthy(fast > 3000, fast)
    assert.truthy(slow > 3000, slow)
  end)

  it("survives a decode started inside another's table building (a finalizer running Lua)", function()
    -- LuaJIT runs __gc finalizers from allocations, here while expat's tree
    -- becomes tables: the inner decode must not touch the outer's document.
    local big = { "<xml>" }
    for i = 1, 300 do big[#big + 1] = "<n" .. i % 7 .. "><v>" .. i .. "</v><w>x</w></n" .. i % 7 .. ">" end
    big[#big + 1] = "</xml>"
    big = table.concat(big)
    local want = core._decode_expat(big, MB, MD, ME)
    local inside, nested = false, 0
    local function make_garbage()
      local p = newproxy(true)
      getmetatable(p).__gc = function()
        if inside then nested = nested + 1 end
        local t = core._decode_expat("<xml><a><b>1</b></a></xml>", MB, MD, ME)
        assert(t.a.b == "1")
      end
    end
    -- An eager collector (each cycle starts at once and does much work per
    -- step) so that cycles end, and finalizers run, inside the decodes
    -- whatever the heap the rest of the suite left.
    local pause = collectgarbage("setpause", 0)
    local stepmul = collectgarbage("setstepmul", 1000)
    local rounds = 0
    while nested < 20 and rounds < 5000 do
      rounds = rounds + 1
      for _ = 1, 20 do make_garbage() end
      inside = true
      local t = core.decode(big, MB, MD, ME)
      inside = false
      assert.same(want, t)
    end
    collectgarbage("setpause", pause)
    collectgarbage("setstepmul", stepmul)
    collectgarbage()
    assert.truthy(nested >= 20, nested .. " in " .. rounds .. " rounds")
  end)
end)
