#!/usr/bin/env bash
# Download Code Llama weights from Meta, with resumable downloads and md5 checks.
#
# Interactive use (same prompts as Meta's original script):
#     bash download.sh
#
# Scripted use (no prompts when the variables are set):
#     PRESIGNED_URL='https://download2.llamameta.net/*?Policy=...&Signature=...' \
#     MODEL_SIZE=7b,7b-Instruct TARGET_FOLDER=models bash download.sh
#
# Environment variables:
#     PRESIGNED_URL       the URL from Meta's email; it contains a '*' that stands
#                         for the file name. Prompted for when unset.
#     MODEL_SIZE          comma-separated list of models (see ALL_MODELS below);
#                         empty means all of them. Prompted for when unset.
#     TARGET_FOLDER       where the files go (default: the current directory).
#     CODELLAMA_MD5_TOOL  'md5sum' (Linux) or 'md5' (macOS); detected when unset.
#
# Exit status: 0 when every requested model downloaded and verified, 1 when
# something failed (see the summary at the end), 2 for usage errors.
#
# Rerunning the script is safe: wget --continue resumes partial files and skips
# complete ones, and every file is verified again against checklist.chk.
# Written to run on bash 3.2 (macOS) as well as on current bash.

set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'   # the header above, as the usage text
    exit 0
fi

readonly ALL_MODELS="7b,13b,34b,70b,7b-Python,13b-Python,34b-Python,70b-Python,7b-Instruct,13b-Instruct,34b-Instruct,70b-Instruct"
readonly REQUEST_URL="https://ai.meta.com/resources/models-and-libraries/llama-downloads/"
readonly EXPIRED_HINT="The presigned URL has probably expired (they are valid for 24 hours and a limited number of downloads); request a new one at ${REQUEST_URL}"

log() { printf '%s\n' "$*"; }
err() { printf 'ERROR: %s\n' "$*" >&2; }
die() {
    local code=$1
    shift
    err "$@"
    exit "$code"
}

# Remove leading and trailing whitespace (pasted URLs often carry some).
trim() {
    local s=$1
    s=${s#"${s%%[![:space:]]*}"}
    s=${s%"${s##*[![:space:]]}"}
    printf '%s' "$s"
}

# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------

command -v wget >/dev/null 2>&1 ||
    die 2 "wget is required but was not found on PATH. Install it (Debian/Ubuntu: 'apt-get install wget', Fedora: 'dnf install wget', macOS: 'brew install wget') and rerun."

MD5_TOOL=${CODELLAMA_MD5_TOOL:-}
if [[ -z $MD5_TOOL ]]; then
    if command -v md5sum >/dev/null 2>&1; then
        MD5_TOOL=md5sum
    elif command -v md5 >/dev/null 2>&1; then
        MD5_TOOL=md5
    else
        die 2 "neither md5sum (Linux, coreutils) nor md5 (macOS) was found; one of them is needed to verify the downloads."
    fi
fi
case $MD5_TOOL in
md5sum | md5) ;;
*) die 2 "CODELLAMA_MD5_TOOL must be 'md5sum' or 'md5', not '${MD5_TOOL}'." ;;
esac
command -v "$MD5_TOOL" >/dev/null 2>&1 ||
    die 2 "CODELLAMA_MD5_TOOL is '${MD5_TOOL}', but ${MD5_TOOL} was not found on PATH."

# Print the lowercase md5 of a file, with md5sum (Linux) or md5 -r (macOS).
file_md5() {
    local out
    case $MD5_TOOL in
    md5sum) out=$(md5sum <"$1") || return 1 ;; # "<hash>  -"
    md5) out=$(md5 -r "$1") || return 1 ;;     # "<hash> <file>"
    esac
    out=${out%%[[:space:]]*}
    out=${out#\\}
    printf '%s' "$out" | tr '[:upper:]' '[:lower:]'
}

# Show wget's progress bar on a terminal; in logs, one dot per MiB instead of a
# line per 50 KiB.
WGET_ARGS=(--quiet)
case $(wget --help 2>&1) in
*--show-progress*)
    WGET_ARGS+=(--show-progress)
    if [[ ! -t 2 ]]; then
        WGET_ARGS+=(--progress=dot:giga)
    fi
    ;;
esac

# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

if [[ -z ${PRESIGNED_URL+set} ]]; then
    PRESIGNED_URL=""
    if ! read -r -p "Enter the URL from email: " PRESIGNED_URL && [[ -z $PRESIGNED_URL ]]; then
        die 2 "no URL given (stdin is closed); set PRESIGNED_URL to the URL from Meta's email."
    fi
fi
PRESIGNED_URL=$(trim "$PRESIGNED_URL")

readonly URL_SHAPE="It is the URL from Meta's email, which looks like https://download2.llamameta.net/*?Policy=...&Signature=...&Key-Pair-Id=...&Download-Request-ID=... where the '*' stands for the file name; copy it whole (and quote it in the shell, it contains '&')."
if [[ -z $PRESIGNED_URL ]]; then
    die 2 "the URL is empty. ${URL_SHAPE}"
fi
if [[ $PRESIGNED_URL != *'*'* ]]; then
    die 2 "the URL does not contain a '*'. ${URL_SHAPE}"
fi
if [[ $PRESIGNED_URL != http://* && $PRESIGNED_URL != https://* ]]; then
    die 2 "the URL does not start with https://. ${URL_SHAPE}"
fi

if [[ -z ${MODEL_SIZE+set} ]]; then
    MODEL_SIZE=""
    if ! read -r -p "Enter the list of models to download without spaces (${ALL_MODELS}), or press Enter for all: " MODEL_SIZE && [[ -z $MODEL_SIZE ]]; then
        die 2 "no model list given (stdin is closed); set MODEL_SIZE (empty for all models)."
    fi
fi
MODEL_SIZE=${MODEL_SIZE//[[:space:]]/}
if [[ -z $MODEL_SIZE ]]; then
    MODEL_SIZE=$ALL_MODELS
fi

# Validate every name before downloading anything; drop duplicates.
MODELS=""
UNKNOWN=""
IFS=',' read -r -a REQUESTED <<<"$MODEL_SIZE"
for m in "${REQUESTED[@]}"; do
    [[ -n $m ]] || continue
    case ",${ALL_MODELS}," in
    *",${m},"*)
        case " ${MODELS} " in
        *" ${m} "*) ;;
        *) MODELS="${MODELS:+${MODELS} }${m}" ;;
        esac
        ;;
    *) UNKNOWN="${UNKNOWN:+${UNKNOWN}, }${m}" ;;
    esac
done
if [[ -n $UNKNOWN ]]; then
    die 2 "unknown model name(s): ${UNKNOWN}. Valid names are: ${ALL_MODELS//,/, } (comma-separated, without spaces; case matters), or nothing for all of them."
fi
[[ -n $MODELS ]] || die 2 "no model selected."

TARGET_FOLDER=${TARGET_FOLDER:-.}

# ---------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------

# True when a file starts with an HTML or XML page (an error or login page that
# a server sent instead of the real file).
looks_like_html() {
    local start
    start=$(head -c 512 -- "$1" 2>/dev/null | LC_ALL=C tr -d '\000' | LC_ALL=C tr '[:upper:]' '[:lower:]') || return 1
    start=${start#"${start%%[![:space:]]*}"}
    case $start in
    '<!doctype'* | '<html'* | '<?xml'* | '<head'* | '<body'* | '<error'*) return 0 ;;
    esac
    return 1
}

# fetch REL_PATH MODE CHECK_HTML
#   REL_PATH   path relative to the URL's '*' and to TARGET_FOLDER
#   MODE       'continue' (resume a partial file) or 'fresh' (start over)
#   CHECK_HTML 'yes' to reject an HTML page served instead of the file
# Returns 0 on success; otherwise prints why, removes the bad file and returns 1.
# Called in conditional context (set -e is off), so every step is checked.
fetch() {
    local rel=$1 mode=$2 check_html=$3
    local dest="${TARGET_FOLDER}/${rel}"
    local url=${PRESIGNED_URL/'*'/"$rel"}
    local rc=0

    if [[ $mode == fresh ]] || looks_like_html "$dest"; then
        # fresh, or an error page an earlier run kept: resuming would only append to it
        rm -f -- "$dest" || return 1
        wget "${WGET_ARGS[@]}" -O "$dest" -- "$url" || rc=$?
    else
        wget "${WGET_ARGS[@]}" --continue -O "$dest" -- "$url" || rc=$?
    fi

    if ((rc != 0)); then
        case $rc in
        8)
            err "${rel}: the server refused the download (an HTTP error such as 403 Forbidden or 404 Not Found; wget exit code 8)."
            err "$EXPIRED_HINT"
            ;;
        4) err "${rel}: network failure (wget exit code 4). Check the connection and rerun this script; the download resumes where it stopped." ;;
        3) err "${rel}: could not write the file (wget exit code 3). Check free disk space and permissions of '${TARGET_FOLDER}'." ;;
        *) err "${rel}: wget failed with exit code ${rc}." ;;
        esac
        # wget leaves an empty file behind on an HTTP error. A partial file from
        # an earlier run that wget did not touch is kept so a rerun resumes it.
        if [[ -f $dest && (! -s $dest || $mode == fresh) ]] || looks_like_html "$dest"; then
            rm -f -- "$dest"
        fi
        return 1
    fi

    if [[ $check_html == yes ]] && looks_like_html "$dest"; then
        err "${rel}: the server sent a web page (HTML) instead of the file; it has been deleted."
        err "$EXPIRED_HINT"
        rm -f -- "$dest"
        return 1
    fi
    return 0
}

# Number of consolidated.NN.pth shards of a model.
shard_count() {
    case ${1%%-*} in
    7b) echo 1 ;;
    13b) echo 2 ;;
    34b) echo 4 ;;
    70b) echo 8 ;;
    *) return 1 ;;
    esac
}

# check_md5 FILE EXPECTED: sets ACTUAL_MD5; true when it matches.
ACTUAL_MD5=""
check_md5() {
    if [[ ! -f $1 ]]; then
        ACTUAL_MD5="(file missing)"
        return 1
    fi
    if ! ACTUAL_MD5=$(file_md5 "$1"); then
        ACTUAL_MD5="(${MD5_TOOL} failed)"
        return 1
    fi
    [[ $ACTUAL_MD5 == "$2" ]]
}

# Verify every file listed in DIR/checklist.chk. A file with a wrong checksum
# is deleted and downloaded once more from scratch, then checked again.
verify_model() {
    local dir=$1
    local checklist="${TARGET_FOLDER}/${dir}/checklist.chk"
    local re='^([0-9a-fA-F]{32})[[:space:]]+[*]?(.*[^[:space:]])[[:space:]]*$'
    local line expected name i count=0 failed=0
    local -a names=() sums=()

    # Read the whole checklist first so nothing below can consume its lines.
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        [[ -n ${line//[[:space:]]/} ]] || continue
        if [[ $line =~ $re ]]; then
            expected=$(printf '%s' "${BASH_REMATCH[1]}" | tr '[:upper:]' '[:lower:]')
            name=${BASH_REMATCH[2]}
            name=${name#./}
            if [[ $name == */* || $name == . || $name == .. ]]; then
                err "${dir}/checklist.chk: refusing entry with a path in it: '${name}'."
                failed=1
                continue
            fi
            names[count]=$name
            sums[count]=$expected
            count=$((count + 1))
        else
            err "${dir}/checklist.chk: malformed line (expected '<md5>  <file>'): ${line}"
            failed=1
        fi
    done <"$checklist" || {
        err "${dir}: cannot read checklist.chk."
        return 1
    }
    if ((count == 0)); then
        err "${dir}/checklist.chk lists no files; cannot verify ${dir}."
        return 1
    fi

    log "Verifying ${count} file(s) of ${dir} with ${MD5_TOOL}"
    for ((i = 0; i < count; i++)); do
        name=${names[i]}
        expected=${sums[i]}
        [[ $name != checklist.chk ]] || continue
        if check_md5 "${TARGET_FOLDER}/${dir}/${name}" "$expected"; then
            log "  ${dir}/${name}: OK"
            continue
        fi
        log "  ${dir}/${name}: checksum mismatch (expected ${expected}, got ${ACTUAL_MD5}); deleting it and re-downloading it once"
        if ! fetch "${dir}/${name}" fresh yes; then
            err "${dir}/${name}: re-download failed."
            failed=1
            continue
        fi
        if check_md5 "${TARGET_FOLDER}/${dir}/${name}" "$expected"; then
            log "  ${dir}/${name}: OK after re-download"
        else
            err "${dir}/${name}: checksum still wrong after re-download: expected ${expected}, got ${ACTUAL_MD5}."
            failed=1
        fi
    done
    return "$failed"
}

download_model() {
    local m=$1
    local dir="CodeLlama-${m}"
    local n s f

    n=$(shard_count "$m") || return 1
    mkdir -p -- "${TARGET_FOLDER}/${dir}" || return 1
    log ""
    log "Downloading ${dir} (${n} shard(s)) into ${TARGET_FOLDER}/${dir}"
    for ((s = 0; s < n; s++)); do
        f=$(printf 'consolidated.%02d.pth' "$s")
        log "  ${dir}/${f}"
        fetch "${dir}/${f}" continue yes || return 1
    done
    for f in params.json tokenizer.model checklist.chk; do
        log "  ${dir}/${f}"
        fetch "${dir}/${f}" continue yes || return 1
    done
    verify_model "$dir"
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

mkdir -p -- "$TARGET_FOLDER" || die 1 "cannot create TARGET_FOLDER '${TARGET_FOLDER}'."
log "Downloading Code Llama into '${TARGET_FOLDER}': ${MODELS}"

for f in LICENSE USE_POLICY.md; do
    log "  ${f}"
    fetch "$f" continue yes || die 1 "could not download ${f}; no model was downloaded."
done

OK_MODELS=""
FAILED_MODELS=""
for m in $MODELS; do
    if download_model "$m"; then
        OK_MODELS="${OK_MODELS:+${OK_MODELS} }CodeLlama-${m}"
    else
        FAILED_MODELS="${FAILED_MODELS:+${FAILED_MODELS} }CodeLlama-${m}"
    fi
done

log ""
log "Summary:"
log "  verified OK: ${OK_MODELS:-none}"
log "  FAILED:      ${FAILED_MODELS:-none}"
if [[ -n $FAILED_MODELS ]]; then
    err "some models failed to download or verify (see the messages above); rerun this script to resume."
    exit 1
fi
log "All requested models downloaded and verified."
