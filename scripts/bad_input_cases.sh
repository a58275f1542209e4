#!/usr/bin/env bash
# Every class of bad input from docs/bad-input.md, tried as a new user would (the acceptance check of the
# "bad input" work): builds a tiny world, tokenizers, packs, runs and scores with the real commands, then
# runs one block per case and records the command, exit code, whether stderr has a traceback, the
# error line and the manifest counts.  Usage (venv active, ~7 min on 2 CPU cores):
#     bash scripts/bad_input_cases.sh [OUT_DIR]      -> OUT_DIR/results.tsv, OUT_DIR/work/logs/
set -u
V=${1:-bad_input_cases}  # output folder (results.tsv, work/, logs/)
V=$(mkdir -p "$V" && cd "$V" && pwd); W=$V/work; L=$W/logs; RES=$V/results.tsv
rm -rf "$W"; mkdir -p "$W" "$L"; cd "$W"
: > "$RES"
T0=$(date +%s)
TRAINQ="--set train.report=false --set train.progress_bar=false --set train.tensorboard=false"

# ---------- helpers ----------
# runc NAME CMD... : run CMD (a string, eval'd in $W); sets RC TB FIRST ERRL NL LASTCMD
runc() {
  local name=$1; shift
  LASTCMD="$*"; CASE=$name
  ( cd "$W" && eval "$LASTCMD" ) >"$L/$name.out" 2>"$L/$name.err"; RC=$?
  tr '\r' '\n' < "$L/$name.err" > "$L/$name.err.tmp" && mv "$L/$name.err.tmp" "$L/$name.err"  # progress-bar frames -> lines
  TB=no; grep -q 'Traceback' "$L/$name.err" && TB=yes
  FIRST=$(grep -m1 -v '^[[:space:]]*$' "$L/$name.err" | cut -c1-400)
  ERRL=$(grep -m1 'error:' "$L/$name.err" | cut -c1-600)
  NL=$(grep -c -v '^[[:space:]]*$' "$L/$name.err")
  DETAIL=""
}
# mj FILE EXPR : python expression over the json in FILE (m), printed compactly; "-" if absent
mj() { python - "$1" "$2" <<'EOF' 2>/dev/null || echo "-"
import json, sys
try:
    m = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"(no {sys.argv[1].split('/work/')[-1]})"); sys.exit(0)
print(eval(sys.argv[2]))
EOF
}
# mt FILE EXPR : exit 0 if EXPR (over the json m in FILE) is true
mt() { python - "$1" "$2" <<'EOF2' 2>/dev/null
import json, sys
try:
    m = json.load(open(sys.argv[1])); sys.exit(0 if eval(sys.argv[2]) else 1)
except Exception:
    sys.exit(1)
EOF2
}
sha() { if [ -e "$1" ]; then sha256sum "$1" | cut -c1-16; else echo absent; fi; }
# rec VERDICT : append the case row
rec() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$CASE" "${LASTCMD//$W\//}" "$RC" "$TB" "$FIRST" "$ERRL" "$NL" \
    "$(echo "$DETAIL" | tr '\t\n' '  ')" "$1" >> "$RES"
  printf '[%4ss] %-34s rc=%s tb=%s | %s\n' "$(( $(date +%s) - T0 ))" "$CASE" "$RC" "$TB" "$1"
}
# vref [CHECK] : verdict for an expected refusal (exit 2, no traceback, an error line; CHECK a bash test)
vref() {
  local ok=1
  [ "$RC" = 2 ] && [ "$TB" = no ] && [ -n "$ERRL" ] || ok=0
  if [ $# -gt 0 ] && [ $ok = 1 ]; then eval "$1" || ok=0; fi
  [ $ok = 1 ] && rec "refused clearly" || rec "NOT FIXED"
}
# vcount CHECK : verdict for an expected counted skip (exit 0, no traceback, CHECK true)
vcount() {
  if [ "$RC" = 0 ] && [ "$TB" = no ] && eval "$1"; then rec "counted skip"; else rec "NOT FIXED"; fi
}
# vok CHECK : verdict for a case whose fix is a correct result (not a refusal or a skip)
vok() {
  if [ "$TB" = no ] && eval "$1"; then rec "fixed (correct result)"; else rec "NOT FIXED"; fi
}

# ---------- build ----------
echo "== build"
b() { echo "+ $*"; ( eval "$*" ) >>"$L/build.log" 2>&1 || { echo "BUILD FAILED: $*"; tail -20 "$L/build.log"; exit 1; }; }
b vlmforge synth --out world --quiet --set synth.num_captions=200 --set synth.samples_per_shard=100 \
  --set synth.num_sft=60 --set synth.num_mcq=10 --set synth.num_vqa=10 --set synth.num_pope_images=5 \
  --set synth.num_preference=5 --set synth.num_text=200 --set synth.num_vision=20
b vlmforge tokenizer train --corpus world --out tokA --vocab-size 512
b vlmforge tokenizer train --corpus world/text/corpus.txt --out tokB --vocab-size 512
b vlmforge tokenizer train --corpus world --out tokC --vocab-size 640
b vlmforge pack --recipe tiny/pretrain --in world/captions --out packA --tokenizer tokA --no-progress
b vlmforge pack --recipe tiny/pretrain --in world/captions/00000.tar --out packA2 --tokenizer tokA --no-progress
b vlmforge train --recipe tiny/pretrain --set train.data_path=packA --set tokenizer.path=tokA \
  --set train.run_dir=runs/pre --set train.epochs=1 --set train.checkpoint_every=2 $TRAINQ
b vlmforge sft-index --recipe tiny/sft --input world/sft/llava.json --out idx --image-root world/sft --tokenizer tokA
b vlmforge sft-index --recipe tiny/sft --input world/sft/llava.json --out idxB --image-root world/sft --tokenizer tokB
b vlmforge eval --ckpt runs/pre/final --tasks vqa:world/eval/vqa.jsonl --limit 3 --out ev1
b vlmforge curate train-filter --in world/captions --out dfn --epochs 1 --exclude-faults world/captions/faults.jsonl
b "mkdir -p pool && cp world/captions/0000?.tar world/captions/0000?_stats.json pool/"
b vlmforge curate score --scorer dfn --model dfn --in pool --out scores
echo "build done in $(( $(date +%s) - T0 ))s"

# Files for the path cases: an image outside the roots, symlinks inside the roots pointing out.
mkdir -p elsewhere sftroot evalroot
cp world/sft/images/sft-000000.jpg elsewhere/x.jpg
cp -r world/sft/images sftroot/images
cp -r world/eval/images evalroot/images
ln -s "$W/elsewhere/x.jpg" sftroot/images/link_out.jpg
ln -s "$W/elsewhere" sftroot/linkdir
ln -s "$W/elsewhere/x.jpg" evalroot/images/link_out.jpg
ln -s "$W/elsewhere" evalroot/linkdir
declare -A BADPATH=(
  [dotdot]="../elsewhere/x.jpg"
  [absolute]="$W/elsewhere/x.jpg"
  [passwd]="../../../../etc/passwd"
  [symlink]="images/link_out.jpg"
  [symlinkdir]="linkdir/x.jpg"
)
# SFT files: lines 1-2 good, line 3 the bad path, lines 4-5 good
for k in "${!BADPATH[@]}"; do
  python - "$k" "${BADPATH[$k]}" <<'EOF'
import json, sys
recs = json.load(open("world/sft/llava.json"))[:5]
recs[2] = dict(recs[2], id="bad-" + sys.argv[1], image=sys.argv[2])
with open(f"sftroot/bad_{sys.argv[1]}.jsonl", "w") as f:
    for r in recs: f.write(json.dumps(r) + "\n")
rows = [json.loads(l) for l in open("world/eval/vqa.jsonl")][:5]
rows[2] = dict(rows[2], id="bad-" + sys.argv[1], image=sys.argv[2])
with open(f"evalroot/bad_{sys.argv[1]}.jsonl", "w") as f:
    for r in rows: f.write(json.dumps(r) + "\n")
EOF
done

# ---------- 1. image paths escaping their root ----------
echo "== 1. paths"
for k in dotdot absolute passwd symlink symlinkdir; do
  runc "sft-path-$k" vlmforge sft-index --recipe tiny/sft --input sftroot/bad_$k.jsonl --out idx_p_$k --image-root sftroot --tokenizer tokA
  DETAIL="bad=${BADPATH[$k]}; records=$(mj idx_p_$k/manifest.json "m['counts']['records']") dropped=$(mj idx_p_$k/manifest.json "m['dropped']") ex=$(mj idx_p_$k/manifest.json "m['dropped_examples']")"
  vcount "mt idx_p_$k/manifest.json \"m['counts']['records']==4 and m['dropped'].get('path_outside_root')==1 and m['dropped_examples']['path_outside_root'][0]['line']==3\""
  runc "sft-path-$k-strict" vlmforge sft-index --recipe tiny/sft --input sftroot/bad_$k.jsonl --out idx_ps_$k --image-root sftroot --tokenizer tokA --strict
  DETAIL="bad=${BADPATH[$k]}; out folder: $( [ -e idx_ps_$k/manifest.json ] && echo 'manifest written' || echo 'no manifest')"
  vref "echo \"\$ERRL\" | grep -q 'bad_$k.jsonl:3' && echo \"\$ERRL\" | grep -q path_outside_root"
done
runc sft-path-absolute-optin vlmforge sft-index --recipe tiny/sft --input sftroot/bad_absolute.jsonl --out idx_p_abs_ok --image-root sftroot --tokenizer tokA --allow-absolute-paths
DETAIL="opt-in: records=$(mj idx_p_abs_ok/manifest.json "m['counts']['records']") dropped=$(mj idx_p_abs_ok/manifest.json "m['dropped']") allow_absolute_paths=$(mj idx_p_abs_ok/manifest.json "m['allow_absolute_paths']")"
vok "[ \"\$RC\" = 0 ] && [ \"\$(mj idx_p_abs_ok/manifest.json \"m['counts']['records']\")\" = 5 ]"

for k in dotdot absolute passwd symlink symlinkdir; do
  runc "eval-path-$k" vlmforge eval --ckpt runs/pre/final --tasks vqa:evalroot/bad_$k.jsonl --out ev_p_$k
  DETAIL="bad=${BADPATH[$k]}; results: $( [ -e ev_p_$k/results.json ] && echo written || echo none)"
  vref "echo \"\$ERRL\" | grep -q 'bad_$k.jsonl:3' && echo \"\$ERRL\" | grep -q path_outside_root"
  runc "eval-path-$k-nostrict" vlmforge eval --ckpt runs/pre/final --tasks vqa:evalroot/bad_$k.jsonl --out ev_pn_$k --no-strict
  DETAIL="bad=${BADPATH[$k]}; $(mj ev_pn_$k/results.json "[(t['counts'], t['skipped']) for t in m['tasks'].values()]")"
  vcount "mt ev_pn_$k/results.json \"[t.get('skipped',{}).get('path_outside_root') for t in m['tasks'].values()]==[1] and [t['counts']['n'] for t in m['tasks'].values()]==[4]\""
done

# ---------- 2. numbers ----------
echo "== 2. numbers"
TR="vlmforge train --recipe tiny/pretrain --set train.data_path=packA --set tokenizer.path=tokA $TRAINQ"
for kv in train.lr=nan train.lr=-1e-3 train.lr=inf train.checkpoint_every=-1 train.keep_last=0 train.warmup_ratio=1.5 train.micro_batch_size=0; do
  n=num-${kv//[=.]/_}
  runc "$n" $TR --set train.run_dir=runs/$n --set $kv
  DETAIL="run folder created: $( [ -e runs/$n ] && echo yes || echo no)"
  vref "[ ! -e runs/$n ] && echo \"\$ERRL\" | grep -q '${kv%%=*}'"
done
printf 'train:\n  keep_last: 0\n' > bad_recipe.yaml
runc num-recipe-file-keep_last vlmforge recipes bad_recipe.yaml
vref "echo \"\$ERRL\" | grep -q bad_recipe.yaml"
runc num-lr-nan-debug vlmforge --debug train --recipe tiny/pretrain --set train.data_path=packA --set tokenizer.path=tokA --set train.run_dir=runs/dbg --set train.lr=nan
DETAIL="--debug should show the traceback"
if [ "$RC" = 2 ] && [ "$TB" = yes ] && [ -n "$ERRL" ]; then rec "refused clearly (traceback shown on --debug, as documented)"; else rec "NOT FIXED"; fi

# non-finite loss during training
runc nonfinite-lr1e10 $TR --set train.run_dir=runs/nan --set train.epochs=1 --set train.checkpoint_every=1 --set train.lr=1e10
DETAIL="latest=$(cat runs/nan/checkpoints/latest 2>/dev/null) ckpts=$(ls runs/nan/checkpoints 2>/dev/null | tr '\n' ' ') final=$( [ -e runs/nan/final ] && echo present || echo absent) last_metrics_nonfinite=$(tail -1 runs/nan/metrics.jsonl | python -c 'import json,sys;print(json.loads(sys.stdin.read()).get("nonfinite"))')"
vref "[ ! -e runs/nan/final ] && [ -e runs/nan/checkpoints/\$(cat runs/nan/checkpoints/latest) ]"
runc nonfinite-skip-opt-in $TR --set train.run_dir=runs/nanskip --set train.epochs=1 --set train.lr=1e10 --set train.skip_nonfinite_steps=true
DETAIL="opt-in skip: manifest counts=$(mj runs/nanskip/manifest.json "m.get('counts')") stdout=$(tail -1 $L/nonfinite-skip-opt-in.out)"
vcount "mt runs/nanskip/manifest.json \"m['counts'].get('skipped_steps',0)>0\""

# ---------- 3. resume with changed settings ----------
echo "== 3. resume"
snap() { echo "config=$(sha runs/pre/config.yaml) run.json=$(sha runs/pre/run.json) metrics=$(sha runs/pre/metrics.jsonl) latest=$(cat runs/pre/checkpoints/latest) ckpts=$(ls runs/pre/checkpoints | tr '\n' ',') final=$(sha runs/pre/final/model.safetensors)"; }
PRE="vlmforge train --recipe tiny/pretrain --set tokenizer.path=tokA --set train.run_dir=runs/pre --set train.checkpoint_every=2 $TRAINQ"
for ch in "lr:--set train.data_path=packA --set train.epochs=1 --set train.lr=3e-4" \
          "epochs:--set train.data_path=packA --set train.epochs=2" \
          "optimizer:--set train.data_path=packA --set train.epochs=1 --set train.optimizer=muon" \
          "data:--set train.data_path=packA2 --set train.epochs=1"; do
  n=resume-${ch%%:*}; before=$(snap)
  runc "$n" $PRE ${ch#*:}
  after=$(snap)
  DETAIL="before: $before | after: $( [ "$before" = "$after" ] && echo UNCHANGED || echo "CHANGED $after") | stderr lines: $(head -6 $L/$n.err | tr '\n' ' ' | cut -c1-300)"
  vref "[ \"$before\" = \"$after\" ]"
done

# ---------- 4. tokenizer agreement ----------
echo "== 4. tokenizers"
runc tok-pack-A-train-B vlmforge train --recipe tiny/pretrain --set train.data_path=packA --set tokenizer.path=tokB --set train.run_dir=runs/tokB $TRAINQ
DETAIL="same vocab size (512), other vocabulary; run folder: $( [ -e runs/tokB ] && echo created || echo none)"
vref "echo \"\$ERRL\" | grep -q tokA && echo \"\$ERRL\" | grep -q tokB"
runc tok-pack-A-train-C vlmforge train --recipe tiny/pretrain --set train.data_path=packA --set tokenizer.path=tokC --set train.run_dir=runs/tokC $TRAINQ
DETAIL="different vocab size (640)"
vref "echo \"\$ERRL\" | grep -q tokA && echo \"\$ERRL\" | grep -q tokC"
runc tok-sftindex-B-init-A vlmforge train --recipe tiny/sft --set sft.index=idxB --set sft.image_root=world/sft --set train.init_from=runs/pre --set train.run_dir=runs/sftB $TRAINQ
DETAIL="index made with tokB, init_from checkpoint with tokA"
vref
runc tok-sft-init-A-tokpath-B vlmforge train --recipe tiny/sft --set sft.index=idx --set sft.image_root=world/sft --set train.init_from=runs/pre --set tokenizer.path=tokB --set train.run_dir=runs/sftB2 $TRAINQ
DETAIL="init_from checkpoint tokenizer tokA, tokenizer.path=tokB"
vref

# ---------- 5. scores covering shards ----------
echo "== 5. scores"
FIL="vlmforge curate filter --in pool --keep 'dfn>=calibrated'"
mkdir -p scores_empty
runc filter-empty-scores $FIL --scores dfn=scores_empty --out kept_empty
DETAIL="out: $(mj kept_empty/manifest.json "m.get('counts')")"
vref
runc filter-missing-scores $FIL --scores dfn=scores_missing --out kept_missing
DETAIL="out: $(mj kept_missing/manifest.json "m.get('counts')")"
vref
cp -r scores scores_partial; rm scores_partial/00001.parquet
runc filter-scores-lack-shard $FIL --scores dfn=scores_partial --out kept_partial
DETAIL="sidecar 00001.parquet removed; out: $(mj kept_partial/manifest.json "m.get('counts')")"
vref "echo \"\$ERRL\" | grep -q 00001"
# rewrite pool/00000.tar in place (one caption changed), same name
python - <<'EOF'
import io, tarfile
p = "pool/00000.tar"
members = []
with tarfile.open(p) as t:
    for m in t.getmembers():
        members.append((m, t.extractfile(m).read()))
with tarfile.open(p, "w") as t:
    for m, data in members:
        if m.name == "000000005.txt":
            data = b"a caption rewritten in place"
            m.size = len(data)
        t.addfile(m, io.BytesIO(data))
EOF
S0=$(sha scores/00000.parquet); S1=$(sha scores/00001.parquet)
runc filter-stale-scores $FIL --scores dfn=scores --out kept_stale
DETAIL="pool/00000.tar rewritten after scoring; out: $(mj kept_stale/manifest.json "m.get('counts')")"
vref "echo \"\$ERRL\" | grep -q 00000"
runc score-rerun-after-rewrite vlmforge curate score --scorer dfn --model dfn --in pool --out scores
DETAIL="sidecar 00000: $S0 -> $(sha scores/00000.parquet); 00001: $S1 -> $(sha scores/00001.parquet); counts=$(mj scores/manifest.json "m['counts']"); stdout/err: $(grep -i -m2 'rescor\|changed\|stale' $L/score-rerun-after-rewrite.out $L/score-rerun-after-rewrite.err | cut -c1-200 | tr '\n' ' ')"
vok "[ \"\$RC\" = 0 ] && [ \"$S0\" != \"\$(sha scores/00000.parquet)\" ] && [ \"$S1\" = \"\$(sha scores/00001.parquet)\" ]"
runc filter-after-rescore $FIL --scores dfn=scores --out kept_after
DETAIL="out: $(mj kept_after/manifest.json "m.get('counts')")"
vok "[ \"\$RC\" = 0 ] && mt kept_after/manifest.json \"m['counts']['reconciled']\""

# ---------- 6. images ----------
echo "== 6. images"
cat > png16.py <<'EOF2'
import io, numpy as np
from PIL import Image
from vlmforge.imagedecode import decode_image
vals = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
b = io.BytesIO(); Image.fromarray(vals).save(b, format="PNG")
print("modes", Image.open(io.BytesIO(b.getvalue())).mode)
print("I;16 png ->", [decode_image(b.getvalue()).getpixel((i, 0)) for i in range(4)])
b2 = io.BytesIO(); Image.fromarray(vals.astype(np.int32)).save(b2, format="TIFF")
print("I tiff ->", [decode_image(b2.getvalue()).getpixel((i, 0)) for i in range(4)])
b3 = io.BytesIO(); Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)).save(b3, format="TIFF")
print("F tiff ->", [decode_image(b3.getvalue()).getpixel((i, 0)) for i in range(4)])
import struct, zlib  # a 48-bit RGB PNG (16 bits per channel), written by hand
def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
row = b"\0" + b"".join(struct.pack(">HHH", v, v, 65535 - v) for v in (0, 1000, 32896, 65535))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 1, 16, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b"")
print("RGB16 png (mode %s) ->" % Image.open(io.BytesIO(png)).mode, [decode_image(png).getpixel((i, 0)) for i in range(4)])
EOF2
runc png16-decode python png16.py
DETAIL="$(tr '\n' ';' < $L/png16-decode.out)  (expected 0,4,128,255 per channel; float 0,64,128,255)"
vok "grep -q 'I;16 png -> \[(0, 0, 0), (4, 4, 4), (128, 128, 128), (255, 255, 255)\]' $L/png16-decode.out"

# truncated tar whose _stats.json says 100
mkdir -p trunc; cp pool/00001.tar pool/00001_stats.json trunc/
python -c "import os; p='trunc/00001.tar'; os.truncate(p, int(os.path.getsize(p)*0.4))"
runc trunc-tar-curate vlmforge curate dedup --in trunc --out trunc_dd --exact uid --near none
DETAIL="counts=$(mj trunc_dd/manifest.json "m['counts']") missing_samples=$(mj trunc_dd/manifest.json "m.get('missing_samples')") dropped=$(mj trunc_dd/manifest.json "m.get('dropped')")"
vcount "mt trunc_dd/manifest.json \"m['counts'].get('missing_samples',0)>0 and m['counts'].get('reconciled') is False\""
runc trunc-tar-pack vlmforge pack --recipe tiny/pretrain --in trunc --out trunc_pack --tokenizer tokA --no-progress
DETAIL="counts=$(mj trunc_pack/manifest.json "m['counts']") missing_samples=$(mj trunc_pack/manifest.json "m.get('missing_samples')")"
vcount "mt trunc_pack/manifest.json \"m['counts'].get('missing_samples',0)>0\""

# 10000x10000 JPEG in a shard, and in an eval row
mkdir -p big
python - <<'EOF'
import io, json, tarfile
from PIL import Image
im = Image.new("RGB", (10000, 10000), (120, 160, 200))
b = io.BytesIO(); im.save(b, format="JPEG", quality=50); huge = b.getvalue(); del im
open("evalroot/images/huge.jpg", "wb").write(huge)
src = tarfile.open("world/captions/00000.tar")
with tarfile.open("big/00000.tar", "w") as t:
    def add(name, data):
        ti = tarfile.TarInfo(name); ti.size = len(data); t.addfile(ti, io.BytesIO(data))
    for m in src.getmembers()[:12]:  # 4 normal samples
        add(m.name, src.extractfile(m).read())
    meta = json.loads(src.extractfile("000000000.json").read())
    meta.update(key="000000900", uid="f" * 32, width=10000, height=10000, sha256=None)
    add("000000900.jpg", huge); add("000000900.txt", b"A large picture of a blue sky."); add("000000900.json", json.dumps(meta).encode())
print("huge jpeg bytes", len(huge))
rows = [json.loads(l) for l in open("world/eval/vqa.jsonl")][:3]
rows[1] = dict(rows[1], id="huge", image="images/huge.jpg")
with open("evalroot/huge.jsonl", "w") as f:
    for r in rows: f.write(json.dumps(r) + "\n")
EOF
runc huge-jpeg-curate vlmforge curate dedup --in big --out big_dd --exact uid --near none
DETAIL="counts=$(mj big_dd/manifest.json "m['counts']") dropped=$(mj big_dd/manifest.json "m.get('dropped')") ex=$(mj big_dd/manifest.json "m.get('dropped_examples',{}).get('image_too_large')")"
vcount "mt big_dd/manifest.json \"m['dropped'].get('image_too_large')==1 and 'cap' in str(m['dropped_examples']['image_too_large'])\""
runc huge-jpeg-pack vlmforge pack --recipe tiny/pretrain --in big --out big_pack --tokenizer tokA --no-progress
DETAIL="counts=$(mj big_pack/manifest.json "m['counts']") dropped=$(mj big_pack/manifest.json "m.get('dropped')") ex=$(mj big_pack/manifest.json "m.get('dropped_examples',{}).get('image_too_large')")"
vcount "mt big_pack/manifest.json \"m['dropped'].get('image_too_large')==1 and 'cap' in str(m['dropped_examples']['image_too_large'])\""
runc huge-jpeg-eval vlmforge eval --ckpt runs/pre/final --tasks vqa:evalroot/huge.jsonl --out ev_huge
vref "echo \"\$ERRL\" | grep -q image_too_large"
runc huge-jpeg-eval-nostrict vlmforge eval --ckpt runs/pre/final --tasks vqa:evalroot/huge.jsonl --out ev_huge_n --no-strict
DETAIL="$(mj ev_huge_n/results.json "[(t['counts'], t.get('skipped')) for t in m['tasks'].values()]")"
vcount "mt ev_huge_n/results.json \"[t.get('skipped',{}).get('image_too_large') for t in m['tasks'].values()]==[1]\""

# ---------- 7. errors a person can read ----------
echo "== 7. errors"
runc sft-index-missing-image-root vlmforge sft-index --recipe tiny/sft --input world/sft/llava.json --out idx_noroot --image-root world/no_such_root --tokenizer tokA
DETAIL="out folder: $( [ -e idx_noroot ] && echo created || echo none)"
vref "echo \"\$ERRL\" | grep -q no_such_root"
runc pack-method-bogus vlmforge pack --recipe tiny/pretrain --in world/captions --out pack_bogus --tokenizer tokA --set pack.method=bogus
vref "echo \"\$ERRL\" | grep -q pack.method"
runc pack-missing-tokenizer vlmforge pack --recipe tiny/pretrain --in world/captions --out pack_notok --tokenizer "$W/no_such_tok"
vref "echo \"\$ERRL\" | grep -q no_such_tok"
runc train-missing-tokenizer vlmforge train --recipe tiny/pretrain --set train.data_path=packA --set tokenizer.path=$W/no_such_tok --set train.run_dir=runs/notok $TRAINQ
vref "echo \"\$ERRL\" | grep -q no_such_tok"
runc sftindex-missing-hub-tokenizer-offline HF_HUB_OFFLINE=1 vlmforge sft-index --recipe tiny/sft --input world/sft/llava.json --out idx_hub --image-root world/sft --tokenizer no-such-org/no-such-tokenizer
vref "echo \"\$ERRL\" | grep -q no-such-org/no-such-tokenizer"
runc train-sft-index-nowhere vlmforge train --recipe tiny/sft --set sft.index=$W/no_such_index --set train.init_from=runs/pre --set train.run_dir=runs/sftnowhere $TRAINQ
vref "echo \"\$ERRL\" | grep -q sft.index"

# unwritable --out: a file used as a folder, and a path under /proc (root ignores chmod 555, so not used)
echo "i am a file" > afile
runc out-fileasdir-sft-index vlmforge sft-index --recipe tiny/sft --input world/sft/llava.json --out afile/idx --image-root world/sft --tokenizer tokA
vref "echo \"\$ERRL\" | grep -q afile"
runc out-fileasdir-pack vlmforge pack --recipe tiny/pretrain --in world/captions --out afile/pack --tokenizer tokA --no-progress
vref "echo \"\$ERRL\" | grep -q afile"
runc out-isfile-eval vlmforge eval --ckpt runs/pre/final --tasks vqa:world/eval/vqa.jsonl --limit 2 --out afile
vref "echo \"\$ERRL\" | grep -q afile"
runc out-fileasdir-train vlmforge train --recipe tiny/pretrain --set train.data_path=packA --set tokenizer.path=tokA --set train.run_dir=afile/run $TRAINQ
vref "echo \"\$ERRL\" | grep -q afile"
runc out-proc-train vlmforge train --recipe tiny/pretrain --set train.data_path=packA --set tokenizer.path=tokA --set train.run_dir=/proc/vlmforge_run $TRAINQ
vref "echo \"\$ERRL\" | grep -q /proc/vlmforge_run"
runc out-proc-synth vlmforge synth --out /proc/vlmforge_world --quiet --set synth.num_captions=10
vref "echo \"\$ERRL\" | grep -q /proc/vlmforge_world"
runc out-proc-tokenizer vlmforge tokenizer train --corpus world --out /proc/vlmforge_tok --vocab-size 300
vref "echo \"\$ERRL\" | grep -q /proc/vlmforge_tok"
runc out-proc-curate-dedup vlmforge curate dedup --in pool --out /proc/vlmforge_dd --exact uid --near none
vref "echo \"\$ERRL\" | grep -q /proc/vlmforge_dd"

# existing non-empty output folder without --overwrite
B_IDX=$(sha idx/manifest.json); B_TOK=$(sha tokA/tokenizer.json); B_EV=$(sha ev1/results.json)
runc exists-sft-index vlmforge sft-index --recipe tiny/sft --input world/sft/llava.json --out idx --image-root world/sft --tokenizer tokB
DETAIL="idx/manifest.json $B_IDX -> $(sha idx/manifest.json)"
vref "[ \"$B_IDX\" = \"\$(sha idx/manifest.json)\" ]"
runc exists-tokenizer-train vlmforge tokenizer train --corpus world/text/corpus.txt --out tokA --vocab-size 300
DETAIL="tokA/tokenizer.json $B_TOK -> $(sha tokA/tokenizer.json)"
vref "[ \"$B_TOK\" = \"\$(sha tokA/tokenizer.json)\" ]"
runc exists-eval vlmforge eval --ckpt runs/pre/final --tasks vqa:world/eval/vqa.jsonl --limit 2 --out ev1
DETAIL="ev1/results.json $B_EV -> $(sha ev1/results.json)"
vref "[ \"$B_EV\" = \"\$(sha ev1/results.json)\" ]"

# sft-index --strict with a bad record on line 2 of a long file
python - <<'EOF'
import json
with open("long.jsonl", "w") as f:
    for i in range(200000):
        if i == 1:
            f.write('{"id": "bad", "conversations": "not a list"}\n'); continue
        f.write(json.dumps({"id": f"t{i}", "conversations": [{"from": "human", "value": f"What is {i} plus one?"},
                                                          {"from": "gpt", "value": f"It is {i + 1}."}]}) + "\n")
EOF
runc strict-line2-long-file /usr/bin/time -f wall_s=%e,maxrss_kb=%M vlmforge sft-index --recipe tiny/sft --input long.jsonl --out idx_long --tokenizer tokA --strict
DETAIL="200000 records (27 MB); $(grep wall_s $L/strict-line2-long-file.err)"
vref "echo \"\$ERRL\" | grep -q 'long.jsonl:2' && [ \$(grep -o 'wall_s=[0-9.]*' $L/strict-line2-long-file.err | cut -d= -f2 | cut -d. -f1) -lt 10 ]"
runc nonstrict-long-file-reference /usr/bin/time -f wall_s=%e,maxrss_kb=%M vlmforge sft-index --recipe tiny/sft --input long.jsonl --out idx_long_ns --tokenizer tokA
DETAIL="reference full scan: $(grep wall_s $L/nonstrict-long-file-reference.err); counts=$(mj idx_long_ns/manifest.json "(m['counts']['records'], m['counts']['scanned'], m['dropped'], m['dropped_examples'])")"
vcount "mt idx_long_ns/manifest.json \"m['dropped']=={'no_conversations': 1} and m['dropped_examples']['no_conversations'][0]['line']==2\""

# one 10 MB turn
python - <<'EOF'
import json
turn = "the red circle sits next to a blue square " * 250000
rec = {"id": "huge", "conversations": [{"from": "human", "value": "Describe everything."}, {"from": "gpt", "value": turn}]}
open("hugeturn.jsonl", "w").write(json.dumps(rec) + "\n")
small = {"id": "s", "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A red circle."}]}
open("smallturn.jsonl", "w").write(json.dumps(small) + "\n")
print(len(turn))
EOF
runc smallturn-rss-reference /usr/bin/time -v vlmforge sft-index --recipe tiny/sft --input smallturn.jsonl --out idx_small --tokenizer tokA
RSS_SMALL=$(grep 'Maximum resident' $L/smallturn-rss-reference.err | awk '{print $NF}')
runc hugeturn-10MB-rss /usr/bin/time -v vlmforge sft-index --recipe tiny/sft --input hugeturn.jsonl --out idx_hugeturn --tokenizer tokA
RSS=$(grep 'Maximum resident' $L/hugeturn-10MB-rss.err | awk '{print $NF}')
TB=no; grep -q Traceback $L/hugeturn-10MB-rss.err && TB=yes
FIRST=$(grep -m1 -v '^[[:space:]]*$' $L/hugeturn-10MB-rss.out)
DETAIL="peak RSS ${RSS} kB (one-record reference ${RSS_SMALL} kB); records=$(mj idx_hugeturn/manifest.json "m['counts']['records'], m['counts']['mm_length_max']")"
vok "[ \"\$RC\" = 0 ] && [ ${RSS:-9999999} -lt 700000 ]"

echo "== done in $(( $(date +%s) - T0 ))s; rows in $RES"
python - "$RES" <<'EOF'
import collections, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
c = collections.Counter(r[8].split(" (")[0] if r[8].startswith("refused") else r[8] for r in rows)
print(len(rows), "cases:", dict(c))
EOF
