# Sourced by the device scripts (gpu_kernels.sh, gpu_quantize.sh): the device has no editable install, so they
# import moequant from a shim folder: every module of the working tree's moequant/ linked, kernels/ linked as
# moequant.kernels (what the editable install maps), and a minimal __init__ so that importing moequant.models or
# moequant.kernels neither imports the whole package nor needs a built moequant._C. Sets ROOT, SITE, PYTHONPATH.
ROOT=$(pwd)
SITE=$(mktemp -d)
mkdir -p "$SITE/moequant"
echo '"""shim: moequant without its top-level imports"""' > "$SITE/moequant/__init__.py"
for f in "$ROOT"/moequant/*; do
  case $(basename "$f") in __init__.py|__pycache__|_C*.so) ;; *) ln -s "$f" "$SITE/moequant/$(basename "$f")" ;; esac
done
ln -s "$ROOT/kernels" "$SITE/moequant/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
