#!/bin/sh
# The chorus images' entry point.
#   (no arguments) or --flags  -> serve [--flags]   (settings from CHORUS_* variables)
#   serve ...                  -> serve ...
#   zoo build|status|path ...  -> python -m transfer.zoo ...   (models into $CHORUS_CACHE)
#   ensemble|transfer ...      -> those console scripts (e.g. ensemble build /data/ensemble ...)
#   default-ensemble           -> zoo build, then the default three-family ensemble into
#                                 $CHORUS_ENSEMBLE (scripts/build_default.sh: Gemma-3's tokenizer, ALM, fit)
#   anything else              -> run as given (python, sh, ...)
set -eu

serve_hint() {
  ensemble="${CHORUS_ENSEMBLE:-}"
  if [ -n "$ensemble" ] && [ ! -f "$ensemble/chorus_ensemble.json" ]; then
    echo "chorus: no ensemble folder at $ensemble: mount one there (volume /data) or build it in the" >&2
    echo "        container first: 'zoo build', then 'ensemble build $ensemble --member NAME=/cache/zoo/models/...'" >&2
  fi
}

case "${1:-}" in
  "" | -*)
    serve_hint
    exec serve "$@"
    ;;
  serve)
    shift
    serve_hint
    exec serve "$@"
    ;;
  zoo)
    shift
    exec python -m transfer.zoo "$@"
    ;;
  default-ensemble)
    python -m transfer.zoo build
    CHORUS_DEFAULT_ENSEMBLE="${CHORUS_ENSEMBLE:-/data/ensemble}" exec chorus-build-default
    ;;
  *)
    exec "$@"
    ;;
esac
